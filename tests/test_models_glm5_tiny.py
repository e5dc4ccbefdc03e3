"""The tiny GLM-5 checkpoint of `glm-serve tiny-glm5`: files, tokenizer, chat template, MTP tensors, and a
chat request served end to end by the native engine."""

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from backends.models.tiny import SPECIAL_TOKENS, STOP_TOKENS, TEMPLATE, TEXT_TAGS
from server.cli import main as cli_main
from server.scheduler.request import SamplingParams
from tests.engine_helpers import one_torch_thread, run_requests, start_engine

TEMPLATE_SHA256 = "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-glm5"
    with one_torch_thread():
        assert cli_main(["tiny-glm5", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_ships_the_glm5_chat_template_bytes():
    assert hashlib.sha256(TEMPLATE.read_bytes()).hexdigest() == TEMPLATE_SHA256


def test_checkpoint_files(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "glm_moe_dsa"
    assert config["index_topk"] < 64 and "shared" in config["indexer_types"]
    assert config["num_nextn_predict_layers"] == 1
    stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    assert json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"] == stop_ids
    assert (tiny_dir / "chat_template.jinja").read_text() == TEMPLATE.read_text()
    layers = config["num_hidden_layers"]
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    mtp = {n for n in names if n.startswith(f"model.layers.{layers}.")}
    assert {f"model.layers.{layers}.{n}" for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight")} <= mtp
    assert f"model.layers.{layers}.mlp.experts.0.gate_proj.weight" in mtp  # hub (per-expert) layout


def test_tokenizer_knows_glm_tokens(tokenizer):
    for token in SPECIAL_TOKENS + TEXT_TAGS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    text = "[gMASK]<sop><|user|>héllo 世界<|assistant|><think>hmm</think><tool_call>f<arg_key>x</arg_key>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    assert kept == "héllo 世界<think>hmm</think><tool_call>f<arg_key>x</arg_key>"  # tags are not special


def _shared_rendered_prompts() -> list[dict]:
    root = os.environ.get("GLM_SERVE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared/data/glm"
    path = Path(root) / "rendered_prompts.jsonl"
    if not path.exists():
        pytest.skip("shared GLM data not found (set GLM_SERVE_SHARED_DATA)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["template"] == "glm47_flash_chat_template.jinja"]


def test_chat_template_renders_like_glm5(tokenizer):
    records = _shared_rendered_prompts()
    assert records
    for record in records:
        rendered = tokenizer.apply_chat_template(
            record["messages"],
            tools=record["tools"],
            add_generation_prompt=record["add_generation_prompt"],
            tokenize=False,
            **record["template_kwargs"],
        )
        assert rendered == record["rendered"], record["id"]


def test_serves_a_chat_end_to_end(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="backends.models.glm")
    with one_torch_thread():
        engine = start_engine(tiny_dir, num_kv_blocks=32)
    assert any("MTP" in r.getMessage() for r in caplog.records)  # the MTP layer was skipped, not an error
    tok = engine.tokenizer
    assert set(tok.convert_tokens_to_ids(STOP_TOKENS)) <= engine.eos_token_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(prompt).endswith("<|assistant|><think>")
    params = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=1.0)]
    with one_torch_thread():
        results = run_requests(engine, [prompt, prompt], params)
    for res in results:
        assert res["finish_reason"] in ("stop", "length")
        assert 1 <= len(res["tokens"]) <= 12 and isinstance(res["text"], str)
