"""glm_moe_dsa (GLM-5: MLA + DSA sparse attention + MoE, with an MTP layer in the checkpoint) against
transformers' GlmMoeDsaForCausalLM, on the tiny GLM-5 checkpoint that `glm-serve tiny-glm5` writes."""

import pytest
import torch

from backends.models.glm_moe_dsa import GlmMoeDsaForCausalLM
from backends.models.tiny import write_tiny_glm5
from glm_kernels.backend import kv_bytes_per_token
from glm_kernels.reference import ReferenceBackend
from server.scheduler.request import SamplingParams
from tests.engine_helpers import (
    check_parity,
    hf_model,
    random_prompts,
    run_requests,
    start_engine,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tiny_glm5(tmp_path_factory):
    return write_tiny_glm5(tmp_path_factory.mktemp("tiny-glm5"))


def test_glm5_parity_with_sparse_attention_and_chunked_prefill(tiny_glm5):
    """index_topk 16 against contexts up to 150 tokens: most queries attend to a subset of their keys."""
    worst, _ = check_parity(
        tiny_glm5, random_prompts(8, 700, seed=5), max_num_batched_tokens=40, num_kv_blocks=128, block_size=16
    )
    print(f"glm_moe_dsa: max relative logit difference {worst:.1e}")


def test_the_sparse_selection_changes_the_result(tiny_glm5):
    """Guard against a test that passes because the selection never drops a key."""
    ref = hf_model(tiny_glm5)
    ids = torch.tensor(random_prompts(5, 700, seed=5)[4:])  # 95 tokens
    with torch.inference_mode():
        sparse = ref(ids).logits
        for layer in ref.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.index_topk = 10**6
        dense = ref(ids).logits
    assert torch.allclose(sparse[0, :16], dense[0, :16], rtol=1e-5, atol=1e-5)  # context <= index_topk
    assert not torch.allclose(sparse[0, 16:], dense[0, 16:], rtol=1e-2, atol=1e-2)


def test_kv_cache_layout_of_glm5():
    """GLM-5's cache dimensions (78 layers, kv_lora_rank 512, rope 64, index_head_dim 128; the rest shrunk):
    in BF16, 576 latent values x 2 bytes x 78 layers, plus 128 indexer-key values per full-indexer layer."""
    from transformers import GlmMoeDsaConfig

    shrunk = dict(hidden_size=8, intermediate_size=8, moe_intermediate_size=8, q_lora_rank=8, vocab_size=16)
    shrunk.update(num_attention_heads=1, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=1)
    shrunk.update(n_routed_experts=2, num_experts_per_tok=1, max_position_embeddings=16)
    indexer_types = ["full", "full", "shared", "shared"] * 19 + ["full", "full"]
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(indexer_types=indexer_types, **shrunk))
    specs = model.kv_cache_specs()
    assert 78 * (512 + 64) * 2 == 89_856
    assert kv_bytes_per_token(specs, torch.bfloat16) == 89_856 + 40 * 128 * 2
    caches = ReferenceBackend().allocate(specs, 2, 4, torch.bfloat16, "cpu")
    assert len(caches) == 78
    assert caches[0].rows.shape == (2, 4, 576) and caches[0].index_keys.shape == (2, 4, 128)
    assert caches[2].index_keys is None  # shared layers keep no indexer keys


def test_runs_in_bfloat16_with_fp32_routing(tiny_glm5):
    engine = start_engine(tiny_glm5, dtype="bfloat16", num_kv_blocks=32, max_num_batched_tokens=32)
    model = engine.core.runner.model
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    router = model.layers[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    caches = engine.core.runner.kv_caches
    assert caches[0].rows.dtype == caches[0].index_keys.dtype == torch.bfloat16
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 3
    results = run_requests(engine, random_prompts(3, 700, seed=6), params)
    assert [len(r["tokens"]) for r in results] == [8, 8, 8]
