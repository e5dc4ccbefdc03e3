"""Attention backends own their KV layout (glm_kernels/backend.py): the cache each one allocates is in the
layout its kernels read. Every backend allocates its caches, writes a step's KV rows and attends through the
same AttentionContext the models use, and must give the plain-torch reference's answer; the vendor ones run
against the FAKE torch_npu / torch_mlu_ops of tests/fakes (which read the layouts their documentation gives:
head-major for torch_mlu_ops, split c_kv / k_pe for torch_npu's MLA). DSA's top-k stays an index tensor on the
device: it runs on the meta device, where any device-to-host copy raises."""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass

import pytest
import torch

from backends.model_dims import from_config
from backends.model_dims import kv_bytes_per_token as planned_kv_bytes
from backends.models import model_class
from backends.models.glm_moe_dsa import DsaAttention
from backends.models.mla import MlaRope
from backends.models.moe import StepState
from backends.models.tiny import tiny_glm5_config, tiny_llama_config
from glm_kernels.backend import (
    AttentionBackend,
    AttentionContext,
    GqaSpec,
    KvLayout,
    MlaLayout,
    MlaSpec,
    kv_bytes_per_token,
)
from glm_kernels.cpu_paged import missing_build_tools
from glm_kernels.metadata import build_step_metadata
from glm_kernels.reference import ReferenceBackend, naive_attention
from glm_kernels.registry import ATTENTION_KERNELS, get_attention_backend
from tests.fakes import install_fake

# decode rows (one context ending mid-block), a chunk over a prefix ending mid-block, a chunk longer than
# FIA-MLA's 16 queries, a first chunk
STARTS, Q_LENS = [150, 37, 0, 21, 0], [1, 1, 1, 27, 9]
NUM_BLOCKS = 24


@dataclass(frozen=True)
class Case:
    """What a backend runs here: its device type (fakes installed), dtype, block size and shapes."""

    device: str
    dtype: torch.dtype
    block_size: int
    mla: tuple[int, int, int] = (64, 32, 4)  # kv_lora_rank, rope_dim, heads
    skip: str | None = None


def _triton_skip() -> str | None:
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        return "needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)"
    return None


CASES = {
    "reference": Case("cpu", torch.float32, 16),
    "cpu": Case("cpu", torch.float32, 16, skip=missing_build_tools()),
    "triton": Case("cpu", torch.float32, 16, skip=_triton_skip()),
    "ascend": Case("npu", torch.float16, 128, mla=(512, 64, 32)),  # FIA's paged and MLA constraints
    "cambricon": Case("mlu", torch.float16, 16),
}
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 3e-3, "atol": 3e-3}}


def test_every_registered_backend_is_covered():
    assert set(CASES) == set(ATTENTION_KERNELS)


@pytest.fixture(params=list(CASES))
def backend_case(request, monkeypatch) -> tuple[AttentionBackend, Case]:
    case = CASES[request.param]
    if case.skip:
        pytest.skip(case.skip)
    for vendor in ("torch_npu", "torch_mlu", "torch_mlu_ops"):
        install_fake(monkeypatch, vendor)
    return get_attention_backend(request.param, case.device, case.block_size), case


def tables(block_size: int) -> list[list[int]]:
    free = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(free)
    return [
        [free.pop() for _ in range(-(-(s + q) // block_size))] for s, q in zip(STARTS, Q_LENS, strict=True)
    ]


def history(block_size: int):
    """The step that wrote every request's context before this one (requests with a context)."""
    which = [i for i, s in enumerate(STARTS) if s]
    t = tables(block_size)
    return which, build_step_metadata(
        [0] * len(which), [STARTS[i] for i in which], [t[i] for i in which], block_size
    )


def new_rows(full: list[torch.Tensor]) -> torch.Tensor:
    """This step's rows of per-request full sequences."""
    return torch.cat([x[s : s + q] for x, s, q in zip(full, STARTS, Q_LENS, strict=True)])


# -- GQA -------------------------------------------------------------------------------------------------
def test_gqa_cache_is_in_the_layout_its_kernel_reads(backend_case):
    backend, case = backend_case
    heads, kv_heads, dim, bs = 8, 2, 64, case.block_size
    [cache] = backend.allocate([GqaSpec(kv_heads, dim, dim)], NUM_BLOCKS, bs, case.dtype, "cpu")
    head_major = backend.kv_layout is KvLayout.HEAD_MAJOR
    assert head_major == (backend.name == "cambricon")  # torch_mlu_ops reads head-major pages
    expected_shape = (NUM_BLOCKS, kv_heads, bs, dim) if head_major else (NUM_BLOCKS, bs, kv_heads, dim)
    assert cache.key.shape == cache.value.shape == expected_shape

    torch.manual_seed(0)
    keys = [torch.randn(s + q, kv_heads, dim).to(case.dtype) for s, q in zip(STARTS, Q_LENS, strict=True)]
    values = [torch.randn_like(k) for k in keys]
    which, past = history(bs)
    past_keys = torch.cat([keys[i][: STARTS[i]] for i in which])
    past_values = torch.cat([values[i][: STARTS[i]] for i in which])
    backend.write_kv(cache, past_keys, past_values, backend.build_metadata(past))
    step = build_step_metadata(STARTS, Q_LENS, tables(bs), bs)
    q = torch.randn(step.num_tokens, heads, dim).to(case.dtype)
    out = AttentionContext.for_step(backend, step).gqa(q, new_rows(keys), new_rows(values), cache, dim**-0.5)

    for t, slot in enumerate(step.slot_mapping.tolist()):  # each new row sits where the layout says
        block, offset = divmod(slot, bs)
        stored = cache.key[block, :, offset] if head_major else cache.key[block, offset]
        assert torch.equal(stored, new_rows(keys)[t])
    for i, (first, start) in enumerate(zip(step.query_start_host[:-1], STARTS, strict=True)):
        rows = slice(first, first + Q_LENS[i])
        expected = naive_attention(q[rows].float(), keys[i].float(), values[i].float(), start, dim**-0.5)
        torch.testing.assert_close(out[rows].float(), expected, **TOL[case.dtype])


# -- MLA with DSA's top-k --------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_mla_cache_is_in_the_layout_its_kernel_reads(backend_case, sparse):
    backend, case = backend_case
    rank, rope, heads = case.mla
    index_dim, bs = 16, case.block_size
    [cache] = backend.allocate([MlaSpec(rank, rope, index_dim)], NUM_BLOCKS, bs, case.dtype, "cpu")
    assert cache.c_kv.shape == (NUM_BLOCKS, bs, rank) and cache.k_pe.shape == (NUM_BLOCKS, bs, rope)
    assert cache.index_keys.shape == (NUM_BLOCKS, bs, index_dim)
    if backend.mla_layout is MlaLayout.SPLIT:  # torch_npu's FIA / sparse attention take two caches
        assert backend.name == "ascend" and cache.rows is None
    else:
        assert cache.rows.shape == (NUM_BLOCKS, bs, rank + rope)
        assert cache.c_kv.data_ptr() == cache.rows.data_ptr()  # views of the one joint tensor

    torch.manual_seed(1)
    lengths = [s + q for s, q in zip(STARTS, Q_LENS, strict=True)]
    latents = [torch.randn(n, rank).to(case.dtype) for n in lengths]
    k_pes = [torch.randn(n, rope).to(case.dtype) for n in lengths]
    index_keys = [torch.randn(n, index_dim) for n in lengths]
    which, past = history(bs)
    past_meta = backend.build_metadata(past)
    past_rows = [torch.cat([x[i][: STARTS[i]] for i in which]) for x in (latents, k_pes, index_keys)]
    backend.write_mla(cache, past_rows[0], past_rows[1], past_meta)
    index_q, index_w = torch.randn(past.num_tokens, 2, index_dim), torch.rand(past.num_tokens, 2)
    backend.dsa_topk(index_q, index_w, past_rows[2], cache, past_meta, 8, 0.25)  # writes the indexer keys

    step = build_step_metadata(STARTS, Q_LENS, tables(bs), bs)
    ctx = AttentionContext.for_step(backend, step)
    topk = None
    if sparse:
        q_idx, w = torch.randn(step.num_tokens, 2, index_dim), torch.rand(step.num_tokens, 2)
        topk = ctx.dsa_topk(q_idx, w, new_rows(index_keys), cache, 8, 0.25)
        assert topk.shape == (step.num_tokens, 8) and topk.dtype == torch.int32
        visible = (step.positions + 1).clamp(max=8)  # a query sees its position + 1 keys
        assert torch.equal((topk >= 0).sum(-1), visible)
    q_latent = torch.randn(step.num_tokens, heads, rank).to(case.dtype)
    q_pe = torch.randn(step.num_tokens, heads, rope).to(case.dtype)
    scale = (rank + rope) ** -0.5
    out = ctx.mla(q_latent, q_pe, new_rows(latents), new_rows(k_pes), cache, scale, topk)

    for t, slot in enumerate(step.slot_mapping.tolist()):
        block, offset = divmod(slot, bs)
        assert torch.equal(cache.c_kv[block, offset], new_rows(latents)[t])
        assert torch.equal(cache.k_pe[block, offset], new_rows(k_pes)[t])
    expected = dense_mla(q_latent, q_pe, latents, k_pes, scale, topk)
    torch.testing.assert_close(out.float(), expected, **TOL[case.dtype])


def dense_mla(q_latent, q_pe, latents, k_pes, scale, topk) -> torch.Tensor:
    """Per query token: softmax over its visible (DSA: selected) latent rows of the scores, applied to them."""
    out, t = [], 0
    for latent, k_pe, start, q_len in zip(latents, k_pes, STARTS, Q_LENS, strict=True):
        rows = torch.cat([latent, k_pe], -1).float()
        for i in range(q_len):
            visible = torch.arange(start + i + 1)
            if topk is not None:
                visible = topk[t][(topk[t] >= 0) & (topk[t] <= start + i)].long()
            q = torch.cat([q_latent[t], q_pe[t]], -1).float()
            weights = (scale * q @ rows[visible].T).softmax(-1)
            out.append(weights @ rows[visible, : latent.shape[-1]])
            t += 1
    return torch.stack(out)


# -- what the planner and the runner count ---------------------------------------------------------------
def test_kv_bytes_do_not_depend_on_the_layout(backend_case):
    """Every layout holds the same values, unpadded: the bytes per token the runner budgets with (and the planner
    counts) are what each backend allocates."""
    backend, case = backend_case
    specs = [GqaSpec(2, 64, 64), MlaSpec(*case.mla[:2], index_dim=16), MlaSpec(*case.mla[:2])]
    caches = backend.allocate(specs, 3, case.block_size, case.dtype, "cpu")
    tensors = [c.key for c in caches[:1]] + [c.value for c in caches[:1]]
    for c in caches[1:]:
        tensors += [c.rows] if c.rows is not None else [c.c_kv, c.k_pe]
        tensors += [c.index_keys] if c.index_keys is not None else []
    allocated = sum(x.numel() * x.element_size() for x in tensors)
    assert allocated == kv_bytes_per_token(specs, case.dtype) * 3 * case.block_size


def tiny_lite_config():
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(
        vocab_size=700, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    "make_config", [tiny_llama_config, tiny_lite_config, lambda: tiny_glm5_config(700, [1])]
)
def test_the_planner_counts_what_the_models_ask_the_backends_for(make_config):
    """backends/model_dims.py (the planner, from config.json alone) and the native model's cache specs agree."""
    config = make_config()
    dims = from_config(config.to_dict(), config.model_type)
    specs = model_class(config.model_type)(config).kv_cache_specs()
    assert kv_bytes_per_token(specs, torch.bfloat16) == planned_kv_bytes(dims, "bfloat16", dims.num_layers)


# -- DSA's top-k: index tensors on the device, no host sync --------------------------------------------------
def test_the_meta_device_catches_host_syncs():
    """The premise of the next test: on the meta device a data-dependent op raises."""
    x = torch.ones(4, device="meta")
    for sync in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x[x > 0], lambda: x.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            sync()


class SpyBackend(ReferenceBackend):
    """The reference, recording the top-k indices the MLA forward receives (and attending to nothing)."""

    def __init__(self) -> None:
        self.received: list[torch.Tensor | None] = []

    def mla_attention(self, q_latent, q_pe, cache, meta, scale, topk_indices):
        self.received.append(topk_indices)
        return q_latent.new_zeros(q_latent.shape)


@torch.inference_mode()
def test_a_dsa_layer_selects_without_a_host_sync():
    """GLM-5's full and shared DSA layers on the meta device: the indexer's top-k, the latent writes and the
    hand-over to the MLA forward run with no device-to-host copy; the shared layer reuses the same tensor."""
    config = tiny_glm5_config(700, [1], index_topk=8)
    with torch.device("meta"):
        rope = MlaRope(config, config.qk_rope_head_dim, interleaved=True)
        full, shared = DsaAttention(config, rope, full=True), DsaAttention(config, rope, full=False)
    backend = SpyBackend()
    rank, rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
    specs = [MlaSpec(rank, rope_dim, config.index_head_dim), MlaSpec(rank, rope_dim)]
    caches = backend.allocate(specs, NUM_BLOCKS, 16, torch.float32, "meta")
    step = build_step_metadata(STARTS, Q_LENS, tables(16), 16, "meta")
    ctx = AttentionContext.for_step(backend, step)
    x = torch.empty(step.num_tokens, config.hidden_size, device="meta")
    state = StepState()
    full(x, ctx.positions, caches[0], ctx, state)
    shared(x, ctx.positions, caches[1], ctx, state)
    [selected, reused] = backend.received
    assert selected.device.type == "meta" and selected.shape == (step.num_tokens, 8)
    assert selected.dtype == torch.int32 and reused is selected
