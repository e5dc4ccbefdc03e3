"""Tiny random GLM checkpoints: the GLM-5 architecture (glm_moe_dsa) at a few MB, with a byte-level BPE
tokenizer that knows GLM's special tokens, GLM's stop tokens and the real GLM-5 chat template. Its outputs
are noise, but serving it runs the real path end to end on a laptop:

    glm-serve tiny-glm5 /tmp/tiny-glm5     (or: python -m backends.models.tiny /tmp/tiny-glm5)
    glm-serve serve --model /tmp/tiny-glm5

`write_random_model` is also what the model tests use to save random glm4_moe / glm4_moe_lite /
glm_moe_dsa checkpoints next to the tokenizer. `write_tiny_llama` is a 2-layer llama with SmolLM2's
tokenizer: the engine tests' model, and the benchmarks' model whose forward is cheap (host overhead
dominates a step, as on an accelerator)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

TEMPLATE = Path(__file__).parent / "templates" / "glm5_chat_template.jinja"

# special=True: control tokens that decoding with skip_special_tokens drops. The think, tool-call and
# argument tags are added tokens with special=False in GLM's tokenizer, so they stay in decoded text.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
TEXT_TAGS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
    "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>", "/nothink",
]  # fmt: skip
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before it.
You are a helpful assistant. What is the capital of France? The capital of France is Paris.
Please call the weather tool for Beijing and Shanghai, then summarize the forecast in one sentence.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n{"location": "Beijing", "unit": "celsius", "days": 3}
Self-hosted inference keeps data inside the company network and lowers the cost per token.
Continuous batching schedules many requests at once; the paged KV cache stores keys and values in blocks.
Mixture-of-experts layers route each token to a few experts, so most weights stay idle for any one token.
Sparse attention lets every query look at its own top-k keys instead of the whole context.
你好，世界。今天天气很好。我们一起学习机器学习和自然语言处理。
1 2 3 4 5 6 7 8 9 10 100 1000 2025 3.14 -42 0x1F True False None null [] {} () <> ; : , . ! ?
"""


def build_glm_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained on a short built-in text, plus GLM's added tokens (deterministic)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = TEMPLATE.read_text()
    return fast


def tiny_glm5_config(vocab_size: int, stop_ids: list[int], **overrides):
    """GLM-5's architecture at toy size: 3 layers (1 dense + 2 MoE), grouped routing over 8 experts, MLA
    with q/kv LoRA, the DSA indexer (index_topk 16; layer 1 reuses layer 0's selection), one MTP layer."""
    from transformers import GlmMoeDsaConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        index_topk=16,
        index_head_dim=32,
        index_n_heads=16,
        indexer_types=["full", "shared", "full"],
        num_nextn_predict_layers=1,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties
        tie_word_embeddings=False,
        eos_token_id=stop_ids,
        bos_token_id=None,  # no pad_token_id: transformers would zero that embedding row (a trained one is not)
    )
    params.update(overrides)
    return GlmMoeDsaConfig(**params)


def tiny_llama_config(**overrides):
    """The config of write_tiny_llama's model (SmolLM2's vocabulary, 2 layers of hidden size 64)."""
    from transformers import LlamaConfig

    params = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def write_tiny_llama(out_dir: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random llama of tiny_llama_config(**overrides) in out_dir, with the tokenizer files and chat
    template of tokenizer_dir (SmolLM2's: its vocabulary is the config's)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def write_random_model(config, out_dir: Path, tokenizer, seed: int = 0, mtp_layers: int = 0) -> Path:
    """Save a randomly initialized transformers model of `config` (the hub's per-expert tensor layout) with
    random router correction biases, the tokenizer, GLM's stop tokens, and `mtp_layers` random MTP layers
    stored as layers num_hidden_layers.. the way GLM checkpoints store them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if mtp_layers:
        _append_mtp_layers(config, out_dir, mtp_layers)
    tokenizer.save_pretrained(out_dir)
    stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    gen = {"eos_token_id": stop_ids, "pad_token_id": stop_ids[0], "do_sample": True, "temperature": 1.0}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out_dir


def _append_mtp_layers(config, out_dir: Path, count: int) -> None:
    """Decoder layers num_hidden_layers.. plus the MTP projections (enorm, hnorm, eh_proj, shared_head),
    written into the checkpoint file next to the main weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    n, hidden = config.num_hidden_layers, config.hidden_size
    donor = AutoModelForCausalLM.from_config(with_mtp_layers(config, count), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        donor.save_pretrained(tmp)  # the hub's per-expert layout
        donor_tensors = load_file(Path(tmp) / "model.safetensors")
    tensors = load_file(out_dir / "model.safetensors")
    for layer in range(n, n + count):
        prefix = f"model.layers.{layer}."
        tensors.update({k: v for k, v in donor_tensors.items() if k.startswith(prefix)})
        scale = config.initializer_range
        tensors[prefix + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden) * scale
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[prefix + norm + ".weight"] = torch.ones(hidden)
        tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def with_mtp_layers(config, count: int):
    """The config with its MTP layers as ordinary decoder layers (the per-layer lists extended by their
    last kind): the model transformers builds from it holds them as layers num_hidden_layers.."""
    bigger = config.to_dict()
    bigger["num_hidden_layers"] = config.num_hidden_layers + count
    for key in ("indexer_types", "mlp_layer_types", "layer_types"):
        if bigger.get(key):
            bigger[key] = bigger[key] + bigger[key][-1:] * count
    return type(config)(**bigger)


def write_tiny_glm5(out_dir: Path, seed: int = 0) -> Path:
    """The tiny GLM-5 checkpoint (config, safetensors incl. the MTP layer, tokenizer, template) in out_dir."""
    tokenizer = build_glm_tokenizer()
    stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = tiny_glm5_config(vocab, stop_ids)
    return write_random_model(config, Path(out_dir), tokenizer, seed=seed, mtp_layers=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glm-serve tiny-glm5",
        description="Write a tiny random GLM-5-architecture checkpoint (noise outputs, real serving path).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_glm5(args.out_dir, seed=args.seed)
    print(f"wrote a tiny GLM-5 checkpoint to {path}; serve it with: glm-serve serve --model {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
