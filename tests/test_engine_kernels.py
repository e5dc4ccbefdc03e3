"""The engine with the profile's attention kernel installed: the Triton kernels (run by Triton's
interpreter on CPU) inside real models give the same greedy tokens and logits as transformers."""

import importlib.util
import os

import pytest

from backends.models.tiny import write_tiny_glm5
from tests.engine_helpers import check_parity, make_tiny_llama, random_prompts

pytestmark = [
    pytest.mark.usefixtures("single_torch_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py on machines without a GPU)",
    ),
]


def test_llama_with_triton_paged_attention(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    prompts = random_prompts(3, 49152, seed=3)
    _, engine = check_parity(model_dir, prompts, max_new=5, attention_kernel="triton", num_kv_blocks=64)
    assert engine.core.runner.attention_kernel == "triton"


def test_glm5_with_triton_mla_and_sparse_topk(tmp_path):
    model_dir = write_tiny_glm5(tmp_path / "tiny-glm5")
    prompts = random_prompts(3, 700, seed=5)
    _, engine = check_parity(
        model_dir, prompts, max_new=4, attention_kernel="triton", num_kv_blocks=64, max_num_batched_tokens=48
    )
    assert engine.core.runner.attention_kernel == "triton"
