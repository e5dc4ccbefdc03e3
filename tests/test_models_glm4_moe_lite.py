"""glm4_moe_lite (GLM-4.7-Flash, MLA) against transformers' Glm4MoeLiteForCausalLM on tiny random checkpoints."""

import pytest
import torch

from backends.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
from backends.models.tiny import write_random_model
from glm_kernels.backend import kv_bytes_per_token
from glm_kernels.reference import ReferenceBackend
from tests.engine_helpers import check_parity, random_prompts

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_config(vocab_size: int, **overrides):
    from transformers import Glm4MoeLiteConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=1.8,
        max_position_embeddings=1024,
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties
    )
    params.update(overrides)
    return Glm4MoeLiteConfig(**params)


def test_glm4_moe_lite_parity_with_chunked_prefill(tmp_path, glm_tokenizer):
    model_dir = write_random_model(tiny_config(768), tmp_path / "glm47-flash", glm_tokenizer)
    worst, _ = check_parity(
        model_dir, random_prompts(8, 700, seed=3), max_num_batched_tokens=40, num_kv_blocks=128, block_size=16
    )
    print(f"glm4_moe_lite: max relative logit difference {worst:.1e}")


def test_glm4_moe_lite_without_q_lora_and_with_preemption(tmp_path, glm_tokenizer):
    """q_proj instead of the q LoRA path, non-interleaved rope, and a KV budget too small for all requests."""
    config = tiny_config(768, q_lora_rank=None, rope_interleave=False, num_hidden_layers=2)
    model_dir = write_random_model(config, tmp_path / "no-q-lora", glm_tokenizer, seed=1)
    _, engine = check_parity(
        model_dir, random_prompts(6, 700, seed=4), max_num_batched_tokens=256, num_kv_blocks=14, block_size=16
    )
    assert engine.stats()["num_preemptions_total"] > 0


def test_kv_cache_holds_the_latent():
    config = tiny_config(768)
    model = Glm4MoeLiteForCausalLM(config)
    specs = model.kv_cache_specs()
    assert kv_bytes_per_token(specs, torch.bfloat16) == 3 * (32 + 16) * 2
    [cache, *_] = ReferenceBackend().allocate(specs, 4, 16, torch.float32, "cpu")
    assert cache.rows.shape == (4, 16, 48) and cache.index_keys is None
