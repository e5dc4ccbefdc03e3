"""glm4_moe (GLM-4.5/4.6/4.7) against transformers' Glm4MoeForCausalLM on a tiny random checkpoint."""

import pytest
import torch

from backends.models.glm4_moe import Glm4MoeForCausalLM
from backends.models.tiny import write_random_model
from glm_kernels.cpu_paged import missing_build_tools
from tests.engine_helpers import check_parity, random_prompts

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_config(vocab_size: int, **overrides):
    from transformers import Glm4MoeConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,  # one dense layer, two MoE layers
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # partial rotary: the first 8 dims of each head
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        attention_bias=True,
        use_qk_norm=True,
        max_position_embeddings=1024,
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties
    )
    params.update(overrides)
    return Glm4MoeConfig(**params)


@pytest.mark.parametrize(
    "kernel",
    [
        "reference",
        pytest.param(
            "cpu", marks=pytest.mark.skipif(missing_build_tools() is not None, reason="no C++ build tools")
        ),
    ],
)
def test_glm4_moe_parity_with_chunked_prefill(tmp_path, glm_tokenizer, kernel):
    model_dir = write_random_model(tiny_config(768), tmp_path / "glm4-moe", glm_tokenizer)
    worst, engine = check_parity(
        model_dir,
        random_prompts(8, 700),
        max_num_batched_tokens=40,
        num_kv_blocks=128,
        block_size=16,
        attention_kernel=kernel,
    )
    assert engine.core.runner.attention_kernel == kernel
    print(f"glm4_moe ({kernel} kernel): max relative logit difference {worst:.1e}")


def test_fused_and_per_expert_layouts_load_the_same(tmp_path, glm_tokenizer):
    """save_pretrained writes experts one by one (the hub layout); transformers' in-memory layout stacks them
    ([E, 2I, H] gate_up_proj, [E, H, I] down_proj). Both load into the same parameters."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(768, num_hidden_layers=2)
    per_expert = write_random_model(config, tmp_path / "per-expert", glm_tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    fused = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused

    def load(named):
        model = Glm4MoeForCausalLM(config)
        model.load_weights(named)
        return model.state_dict()

    from backends.loader import iter_safetensors

    a = load(iter_safetensors(per_expert))
    b = load(fused.items())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_quantized_checkpoints_are_refused():
    model = Glm4MoeForCausalLM(tiny_config(768, num_hidden_layers=1))
    fp8 = [("model.layers.0.self_attn.q_proj.weight_scale_inv", torch.ones(1))]
    with pytest.raises(ValueError, match="FP8"):
        model.load_weights(fp8)
