"""glm_kernels/cpu_linear.py: oneDNN linear layers with weights packed at load, against F.linear, and which
layers of a model the runner packs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.parallel import ColumnParallelLinear, Linear, RowParallelLinear, pack_model
from glm_kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (0, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    x = torch.randn(*shape)
    out = cpu_linear.linear(x, cpu_linear.pack(w), b)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_linear.packs(torch.bfloat16), reason="no bf16 oneDNN path on this CPU")
def test_packed_linear_in_bfloat16():
    torch.manual_seed(1)
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(7, 32).bfloat16()
    out = cpu_linear.linear(x, cpu_linear.pack(w))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


def test_parallel_layers_give_the_same_output_packed():
    torch.manual_seed(2)
    layers = [
        Linear(24, 16, bias=True),
        ColumnParallelLinear(24, [("a", 0, 8), ("b", 0, 12)], bias=True),
        RowParallelLinear(0, 24, 10, bias=True),
    ]
    x = torch.randn(6, 24)
    with torch.inference_mode():
        for layer in layers:
            dense = layer(x)
            layer.packed = cpu_linear.pack(layer.weight)
            torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_pack_model_packs_linears_and_the_logits_layer_only(tie):
    from backends.models.llama import LlamaForCausalLM
    from tests.engine_helpers import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300, tie_word_embeddings=tie))
    # per layer: qkv, o_proj, gate_up, down; and the logits rows
    assert pack_model(model) == 2 * 4 + 1
    assert (model.embed_tokens.packed is not None) == tie
    if not tie:
        assert model.lm_head.packed is not None
    hidden = torch.randn(3, 64)
    with torch.inference_mode():
        logits = model.compute_logits(hidden)
    rows = model.embed_tokens.weight if tie else model.lm_head.weight
    torch.testing.assert_close(logits, hidden @ rows.t(), rtol=1e-5, atol=1e-5)


def test_mla_absorbed_projection_is_not_packed():
    """kv_b_proj is only read as a weight (absorbed into q and the output): packing it would waste memory."""
    from backends.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
    from tests.test_models_glm4_moe_lite import tiny_config

    model = Glm4MoeLiteForCausalLM(tiny_config(300))
    assert pack_model(model) > 0
    attn = [m for m in model.modules() if hasattr(m, "kv_b_proj")]
    assert attn and all(m.kv_b_proj.packed is None for m in attn)
    assert all(m.kv_a_proj_with_mqa.packed is not None and m.o_proj.packed is not None for m in attn)
