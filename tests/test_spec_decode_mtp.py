"""Speculative decoding with GLM's MTP layer on tiny random GLM-4.5 and GLM-5 checkpoints: the MTP module's
forward against a reference written from vLLM's definition (DeepSeekMultiTokenPredictorLayer), and greedy
outputs with mtp drafts equal to those without, under preemption.

The reference runs transformers' own decoder layer num_hidden_layers (the checkpoint's MTP block) with the
final norm replaced by shared_head.norm. Where it deviates from vLLM: nowhere in the layer; the drafter uses
the target's embedding and head, which vLLM shares with the target too (the checkpoint's copies are equal)."""

import pytest
import torch
import torch.nn.functional as F

from backends.loader import iter_safetensors
from backends.models.tiny import tiny_glm5_config, with_mtp_layers, write_random_model
from glm_kernels.backend import AttentionContext
from glm_kernels.metadata import build_step_metadata
from glm_kernels.reference import ReferenceBackend
from server.scheduler.request import SamplingParams
from tests.engine_helpers import random_prompts, run_requests, start_engine
from tests.test_models_glm4_moe import tiny_config as glm45_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MTP = {"method": "mtp", "num_speculative_tokens": 3}


@pytest.fixture(scope="module", params=["glm4_moe", "glm_moe_dsa"])
def model_dir(request, tmp_path_factory, glm_tokenizer):
    stop_ids = glm_tokenizer.convert_tokens_to_ids(["<|endoftext|>"])
    config = (
        glm45_config(768, num_nextn_predict_layers=1)
        if request.param == "glm4_moe"
        else tiny_glm5_config(768, stop_ids)
    )
    return write_random_model(config, tmp_path_factory.mktemp(request.param), glm_tokenizer, mtp_layers=1)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.inference_mode()
def reference_mtp(model_dir, next_ids, hidden):
    """vLLM's MTP layer, step by step, with transformers' decoder layer as its mtp_block."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    n, eps = config.num_hidden_layers, config.rms_norm_eps
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, config=with_mtp_layers(config, 1), dtype=torch.float32
    )
    w = {
        k.removeprefix(f"model.layers.{n}."): v for k, v in load_file(model_dir / "model.safetensors").items()
    }
    positions = torch.arange(len(next_ids))
    embeds = hf.model.embed_tokens(next_ids)
    embeds[positions == 0] = 0  # vLLM masks the input at position 0
    x = F.linear(torch.cat([rms(embeds, w["enorm.weight"], eps), rms(hidden, w["hnorm.weight"], eps)], -1),
                 w["eh_proj.weight"])  # fmt: skip
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[n]])  # the MTP block alone
    hf.model.config.num_hidden_layers = 1
    hf.model.norm.weight.copy_(w["shared_head.norm.weight"])
    out = hf.model(inputs_embeds=x[None], use_cache=False).last_hidden_state[0]
    return out @ w["shared_head.head.weight"].t()


@torch.inference_mode()
def our_mtp(model_dir, next_ids, hidden):
    from transformers import AutoConfig

    from backends.models import model_class

    config = AutoConfig.from_pretrained(model_dir)
    model = model_class(config.model_type)(config)
    model.add_mtp_layer()
    model.load_weights(iter_safetensors(model_dir))
    model = model.float().eval()
    backend = ReferenceBackend()
    mtp_cache = backend.allocate(model.kv_cache_specs(), 4, 16, torch.float32, torch.device("cpu"))[-1]
    step = build_step_metadata([0], [len(next_ids)], [[0, 1, 2, 3]], 16, torch.device("cpu"))
    attn = AttentionContext.for_step(backend, step)
    out = model.mtp.predict(model.embed_tokens(next_ids), hidden, attn.positions, mtp_cache, attn)
    return model.compute_logits(out)


def test_mtp_layer_matches_vllms_definition(model_dir):
    torch.manual_seed(0)
    next_ids = torch.randint(3, 700, (40,))
    hidden = torch.randn(40, 64)
    ours, ref = our_mtp(model_dir, next_ids, hidden), reference_mtp(model_dir, next_ids, hidden)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"MTP logits differ by {rel:.2e} relative"


@pytest.mark.parametrize("num_kv_blocks", [64, 14])  # 14 blocks of 16 tokens: requests are preempted
def test_greedy_with_mtp_equals_without(model_dir, num_kv_blocks):
    prompts = random_prompts(6, 700, seed=2)
    prompts.append(list(prompts[1]))  # the same prompt twice: prefix-cache hits
    params = [SamplingParams(max_tokens=12 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(7)]
    args = dict(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=96)
    plain = run_requests(start_engine(model_dir, **args), prompts, params)
    engine = start_engine(model_dir, speculative_config=MTP, **args)
    assert engine.core.runner.model.mtp is not None
    assert run_requests(engine, prompts, params) == plain
    stats = engine.core.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    if num_kv_blocks == 14:
        assert engine.core.scheduler.num_preemptions_total > 0
    kv = engine.core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks() == kv.num_blocks
