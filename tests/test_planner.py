"""The memory planner against hand-computed numbers (dims from transformers' configuration defaults and the
model cards, see backends/model_dims.py), and its CLI verdicts."""

from __future__ import annotations

import json

import pytest

from backends import planner
from backends.model_dims import (
    BUILTIN,
    Layout,
    Precision,
    active_param_count,
    from_config,
    kv_bytes_per_token,
    param_count,
    resolve,
    weight_bytes_per_device,
)
from backends.planner import check_fits, plan
from server.config import load_config

GLM5 = BUILTIN["GLM-5"]


def test_glm5_mla_cache_by_hand():
    # MLA latent: (kv_lora_rank 512 + qk_rope_head_dim 64) values x 2 bytes x 78 layers
    assert 576 * 2 * 78 == 89_856
    # + DSA indexer keys: index_head_dim 128 x 2 bytes on each of the 78 layers with an indexer
    assert kv_bytes_per_token(GLM5, "bfloat16", 78) == 89_856 + 128 * 2 * 78 == 109_824
    # vLLM on CUDA keeps the indexer keys as fp8 + one fp32 scale per 128 values: 132 bytes per layer
    assert kv_bytes_per_token(GLM5, "bfloat16", 78, vllm_cuda=True) == 89_856 + 132 * 78 == 100_152
    # ... and an fp8 cache is the 656-byte fp8_ds_mla record per layer
    assert kv_bytes_per_token(GLM5, "fp8", 78, vllm_cuda=True) == (656 + 132) * 78 == 61_464
    # the latent is not split by TP; pipeline stages split the layers
    assert kv_bytes_per_token(GLM5, "bfloat16", 39, tp=8) == 109_824 // 2


def test_gqa_cache_by_hand():
    glm47 = BUILTIN["GLM-4.7"]  # 92 layers, 8 KV heads of 128
    assert kv_bytes_per_token(glm47, "bfloat16", 92) == 2 * 92 * 8 * 128 * 2 == 376_832
    assert kv_bytes_per_token(glm47, "bfloat16", 92, tp=8) == 376_832 // 8
    assert (
        kv_bytes_per_token(glm47, "bfloat16", 92, tp=16) == 376_832 // 8
    )  # a KV head is replicated, not split
    smol = BUILTIN["SmolLM2-135M-Instruct"]
    assert kv_bytes_per_token(smol, "float32", 30) == 2 * 30 * 3 * 64 * 4 == 46_080


def test_parameter_counts_match_the_model_cards():
    assert abs(param_count(GLM5) / 744e9 - 1) < 0.002  # "744B parameters (40B active)"
    assert abs(active_param_count(GLM5) / 40e9 - 1) < 0.03
    assert (
        9e9 < param_count(GLM5, mtp=True) - param_count(GLM5) < 11e9
    )  # one MTP layer: a MoE layer + eh_proj
    glm47 = BUILTIN["GLM-4.7"]
    assert abs(param_count(glm47, mtp=True) / 355e9 - 1) < 0.01  # "355B parameters (32B active)"
    assert abs(active_param_count(glm47) / 32e9 - 1) < 0.04
    assert abs(param_count(BUILTIN["GLM-4.5-Air"]) / 106e9 - 1) < 0.01
    assert abs(param_count(BUILTIN["GLM-4.7-Flash"]) / 30e9 - 1) < 0.01
    # SmolLM2-135M by hand: tied embedding 49152 x 576; per layer q,o 576x576, k,v 576x192, MLP 3 x 576 x 1536,
    # two norms; final norm
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert param_count(BUILTIN["SmolLM2-135M-Instruct"]) == 49152 * 576 + 30 * layer + 576 == 134_515_008


def test_glm5_weight_bytes_by_hand():
    h, vocab = 6144, 154880
    embed_head = 2 * vocab * h * 2  # BF16 in every format
    fp8_total = weight_bytes_per_device(GLM5, Layout(), Precision.of("fp8"))
    bf16_total = weight_bytes_per_device(GLM5, Layout(), Precision.of("bfloat16"))
    assert bf16_total == pytest.approx(2 * param_count(GLM5))
    linear = param_count(GLM5) - embed_head / 2
    assert fp8_total == pytest.approx(linear + embed_head, rel=0.002)  # norms and router stay 16-bit
    # at tp 8, all but the replicated parts divide by 8: q_a_proj, kv_a_proj_with_mqa, the indexer's wq_b and
    # wk (fp8), its weights_proj and the 75 MoE routers (16-bit)
    replicated = 78 * (h * 2048 + h * 576 + 2048 * 32 * 128 + h * 128) + 2 * (78 * h * 32 + 75 * 256 * h)
    per_device = weight_bytes_per_device(GLM5, Layout(tp=8), Precision.of("fp8"))
    assert per_device == pytest.approx(fp8_total / 8 + replicated * 7 / 8, rel=0.0005)
    w4a8 = weight_bytes_per_device(GLM5, Layout(), Precision.of("w4a8"))
    assert w4a8 == pytest.approx(linear / 2 + embed_head, rel=0.002)


def test_expert_parallel_spreads_experts_over_tp_times_dp():
    tp_only = weight_bytes_per_device(GLM5, Layout(tp=8, dp=2), Precision.of("w8a8"))
    with_ep = weight_bytes_per_device(GLM5, Layout(tp=8, dp=2, ep=16), Precision.of("w8a8"))
    experts = 75 * 256 * 3 * 6144 * 2048  # routed experts of the 75 MoE layers, one byte each
    assert tp_only - with_ep == pytest.approx(experts / 8 - experts / 16, rel=0.001)


def test_glm5_bf16_does_not_fit_8_h100():
    cfg = load_config(
        "nvidia-h100",
        {"engine.nodes": 1, "engine.pipeline_parallel_size": 1, "engine.weight_dtype": "bfloat16"},
    )
    result = check_fits(cfg, "GLM-5")
    # 189.7 GB of the model + 2.5 GB of its MTP layer, which the profile's MTP speculative decoding loads
    assert result.mtp_loaded and not result.fits and "weights need 192.2 GB per device" in result.reason
    assert result.suggestion.startswith("32 x h100-80gb (tp 8 x pp 4")


def test_glm5_fp8_layouts():
    h200 = plan(load_config("nvidia-h200"), "GLM-5")
    assert h200.fits and h200.devices == 8
    # KV per GPU = budget - weights; tokens = that / 100,152 B, in 64-token blocks; one 202,752-token sequence
    kv = h200.budget_bytes - h200.weight_bytes_per_device
    assert h200.kv_tokens_per_replica == kv // 100_152 // 64 * 64
    assert h200.concurrent_seqs == h200.kv_tokens_per_replica // 202_752
    h100 = plan(load_config("nvidia-h100"), "GLM-5")
    assert h100.fits and (h100.tp, h100.pp, h100.devices) == (8, 2, 16)
    one_node = plan(
        load_config("nvidia-h100", {"engine.nodes": 1, "engine.pipeline_parallel_size": 1}), "GLM-5"
    )
    assert not one_node.fits


def test_glm5_on_a100_has_no_kernels():
    result = plan(load_config("nvidia-a100", {"engine.tensor_parallel_size": 8}), "GLM-5")
    assert not result.fits and "no sparse-MLA kernels" in result.reason


def test_concurrent_sequences_count_every_replica():
    result = plan(load_config("ascend-910b"), "GLM-5", context=16384)
    assert result.replicas == 2
    assert result.concurrent_seqs == result.kv_tokens_per_replica // 16384 * 2


def test_check_fits_on_cpu_default():
    result = check_fits(load_config("cpu"), None)
    assert result.fits and result.model == "SmolLM2-135M-Instruct" and result.accelerator == "host"
    assert result.kv_tokens_per_replica == (2 << 30) // 46_080 // 16 * 16  # the profile's 2 GiB of KV


def test_reads_config_json_from_a_directory(tmp_path):
    config = {
        "model_type": "glm_moe_dsa", "vocab_size": 154880, "hidden_size": 6144, "num_hidden_layers": 78,
        "num_attention_heads": 64, "num_key_value_heads": 64, "intermediate_size": 12288,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 2048, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 192, "v_head_dim": 256, "index_topk": 2048, "index_head_dim": 128,
        "index_n_heads": 32, "num_nextn_predict_layers": 1, "max_position_embeddings": 202752,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    dims = resolve(str(tmp_path))
    assert param_count(dims) == param_count(GLM5) and dims.indexer_layers == 78 and dims.mtp_layers == 1
    fp8 = dict(config, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    (tmp_path / "config.json").write_text(json.dumps(fp8))
    notes = plan(load_config("nvidia-h200"), str(tmp_path)).notes
    assert any("checkpoint is quantized (fp8); planned as fp8" in n for n in notes)
    shared = from_config(
        dict(config, indexer_types=["full", "shared", "shared", "shared"] * 19 + ["full"] * 2), "x"
    )
    assert shared.indexer_layers == 21
    assert kv_bytes_per_token(shared, "bfloat16", 78) == 89_856 + 21 * 256


def test_config_json_without_the_needed_keys_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 64}))
    with pytest.raises(ValueError, match="has no 'num_hidden_layers'"):
        resolve(str(tmp_path))


def test_cli_exit_codes_and_json(capsys):
    assert planner.main(["--profile", "nvidia-h200", "--model", "GLM-5"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert (
        planner.main(["--profile", "nvidia-h200", "--model", "GLM-5", "--set", "weight_dtype=bfloat16"]) == 1
    )
    assert "DOES NOT FIT: weights need" in capsys.readouterr().out
    assert planner.main(["--profile", "nvidia-h100", "--model", "GLM-5", "--nodes", "1", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["pp"] == 1 and out["kv_bytes_per_token_model"] == 100_152
    assert planner.main(["--profile", "nvidia-h200", "--model", "GLM-4.7-Flash"]) == 1  # 20 heads, tp 8
    assert "does not divide the 20 attention heads" in capsys.readouterr().out
    assert planner.main(["--profile", "cpu", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert planner.main(["--profile", "nvidia-h200", "--set", "engine.bogus=1"]) == 2
    assert "engine.bogus" in capsys.readouterr().err


def test_cli_all_checks_the_profile(capsys):
    assert planner.main(["--profile", "nvidia-a100", "--all"]) == 0
    out = capsys.readouterr().out
    assert "GLM-4.5-Air" in out and "does not fit" in out


@pytest.mark.slow  # imports transformers' modeling code (seconds); the arithmetic above runs without it
def test_parameter_formulas_match_transformers_models():
    """Tiny random configs of each family built by transformers on the meta device: the planner's parameter
    count equals the checkpoint's tensors (parameters, tied ones once, plus persistent buffers such as the
    routers' e_score_correction_bias)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Glm4MoeConfig,
        Glm4MoeLiteConfig,
        GlmMoeDsaConfig,
        LlamaConfig,
    )

    small = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    moe = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
    mla = dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    configs = [
        GlmMoeDsaConfig(**small, **moe, **mla, num_hidden_layers=4, num_key_value_heads=4, first_k_dense_replace=1,
                        index_n_heads=2, index_head_dim=16, index_topk=4),
        Glm4MoeConfig(**small, **moe, num_hidden_layers=3, num_key_value_heads=2, head_dim=24,
                      first_k_dense_replace=1, attention_bias=True),
        Glm4MoeLiteConfig(**small, **moe, **mla, num_hidden_layers=3, num_key_value_heads=4),
        LlamaConfig(**small, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True),
    ]  # fmt: skip
    for config in configs:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        stored = set(model.state_dict())
        expected = sum(p.numel() for p in model.parameters())
        expected += sum(b.numel() for name, b in model.named_buffers() if name in stored)
        assert param_count(from_config(config.to_dict(), config.model_type)) == expected, config.model_type


def test_the_mtp_layer_is_counted_only_with_mtp_speculative_decoding():
    with_mtp = check_fits(load_config("nvidia-h200"), "GLM-5")
    without = check_fits(
        load_config("nvidia-h200", {"vllm.speculative_config": {"method": "ngram"}}), "GLM-5"
    )
    assert with_mtp.mtp_loaded and not without.mtp_loaded
    assert with_mtp.weight_bytes_per_device > without.weight_bytes_per_device


def test_native_mtp_counts_the_mtp_layer_and_its_kv_pages():
    mtp = {"method": "mtp", "num_speculative_tokens": 3}
    with_mtp = plan(load_config("cpu", {"vllm.speculative_config": mtp}), "GLM-5")
    without = plan(load_config("cpu"), "GLM-5")
    assert with_mtp.mtp_loaded and not without.mtp_loaded
    assert with_mtp.weight_bytes_per_device > without.weight_bytes_per_device
    # one layer more in the same pool: 78 decoder layers + the MTP layer
    assert with_mtp.kv_bytes_per_token_device * 78 == without.kv_bytes_per_token_device * 79
