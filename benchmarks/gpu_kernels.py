"""Decode attention on one GPU: the Triton paged kernels against torch SDPA over gathered KV, as achieved
memory bandwidth against the card's measured copy bandwidth (issue target: decode >= 70% of copy).

Workloads (fixed seed; bf16; block_size 16 as the profiles use; physical blocks shuffled; each request's
context 4096 minus 0..15 tokens, so contexts end mid-block):
    gqa      batch 64, 96 query heads / 8 KV heads x 128 (GLM-4.5/4.6 attention per layer)
    mla16    batch 64, MLA latent 512 + rope 64, 16 query heads (one head block)
    mla64    the same with 64 query heads (four head blocks over the same latent rows)
    dsa64    mla64 with GLM-5's DSA: each token attends to 2048 of its keys (top-k index lists)
For each: the Triton kernel's output is checked against glm_kernels/reference on the same inputs, then timed
(triton.testing.do_bench: L2 flushed before each run, median) with its default launch configuration and the
best of a small sweep (each swept configuration is checked too), next to
    reference  glm_kernels/reference (gather the blocks, then SDPA): the native engine's kernel today
    sdpa       SDPA alone over KV gathered beforehand: the reference without its gather
Bytes = what a decode kernel must move: every visible K/V (or latent) row once, the queries, the outputs.
Copy bandwidth = 2 x bytes / time of a 1 GiB device-to-device copy.

    python benchmarks/gpu_kernels.py [--profile nvidia-h100] [--quick]        # about 2-5 minutes on an H100
Writes benchmarks/results/kernels_<time>.json and prints a markdown table for benchmarks/KERNELS.md.
--smoke runs tiny shapes through Triton's interpreter on CPU to check this script, not to time anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET = 0.70


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="nvidia-h100", help="profile name recorded in the JSON")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop sweeping after this much time")
    p.add_argument("--quick", action="store_true", help="default configurations only, no sweep")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, Triton interpreter on CPU")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


ARGS = parse_args(None if __name__ == "__main__" else [])
if __name__ == "__main__":  # triton reads this when it is imported and when kernels are decorated
    if ARGS.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from glm_kernels import metadata, reference  # noqa: E402
from glm_kernels.mla_reference import mla_paged_attention as reference_mla_attention  # noqa: E402
from glm_kernels.triton_mla import mla_group  # noqa: E402
from glm_kernels.triton_paged import build_triton_metadata, paged_decode  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"
GQA_SWEEP = {
    "block_n": (32, 64, 128),
    "num_warps": (4, 8),
    "num_splits": (None, 1, 2, 4),
    "num_stages": (2, 3),
}
MLA_SWEEP = {"block_h": (16, 32), "block_n": (16, 32, 64), "num_warps": (4, 8), "num_splits": (None, 2, 4, 8)}


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of one call."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    n = (1 << 20) if ARGS.smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src))


def decode_batch(batch: int, context: int, block_size: int, seed: int = 0):
    """Decode metadata: request i's context is `context` minus 0..15 tokens; blocks shuffled."""
    rng = random.Random(seed)
    seq_lens = [context - rng.randrange(16) for _ in range(batch)]
    need = [math.ceil(n / block_size) for n in seq_lens]
    free = list(range(sum(need)))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(k)] for k in need]
    step = metadata.build_step_metadata([n - 1 for n in seq_lens], [1] * batch, tables, block_size, DEVICE)
    return build_triton_metadata(step), sum(need), seq_lens


def check_close(out: torch.Tensor, expected: torch.Tensor) -> float:
    err = (out.float() - expected.float()).abs().max().item()
    if not err < 3e-2:
        raise AssertionError(f"kernel output differs from the reference by {err}")
    return err


def sweep(run: Callable[..., torch.Tensor], space: dict, expected: torch.Tensor, deadline: float) -> dict:
    """Time every configuration of `space` until the deadline; each is checked against `expected`."""
    results = []
    for values in itertools.product(*space.values()):
        if time.monotonic() > deadline:
            break
        config = dict(zip(space, values, strict=True))
        try:
            check_close(run(**config), expected)
            results.append({**config, "seconds": bench(lambda c=config: run(**c))})
        except Exception as exc:  # a configuration that does not compile or fit is recorded, not fatal
            results.append({**config, "error": f"{type(exc).__name__}: {exc}"[:200]})
    timed = [r for r in results if "seconds" in r]
    return {"best": min(timed, key=lambda r: r["seconds"]) if timed else None, "tried": results}


def gqa_workload(dtype: torch.dtype, deadline: float) -> dict:
    heads, kv_heads, dim = (96, 8, 128) if not ARGS.smoke else (12, 2, 32)
    meta, num_blocks, seq_lens = decode_batch(ARGS.batch, ARGS.context, ARGS.block_size)
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, ARGS.block_size, kv_heads, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(ARGS.batch, heads, dim, dtype=dtype, device=DEVICE)
    scale = dim**-0.5
    (view,) = meta.views
    out = torch.empty_like(q)

    def triton_run(**config) -> torch.Tensor:
        paged_decode(q, k_cache, v_cache, out, view, scale, **config)
        return out

    group = meta.groups[0]
    kg = metadata.gather_kv(k_cache, group).transpose(1, 2).contiguous()  # [B, kv_heads, L, D]
    vg = metadata.gather_kv(v_cache, group).transpose(1, 2).contiguous()

    def sdpa_run() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q[:, :, None], kg, vg, attn_mask=group.kv_mask, scale=scale, enable_gqa=True
        )

    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    kv_bytes = sum(seq_lens) * kv_heads * 2 * dim * k_cache.element_size()
    io_bytes = 2 * q.numel() * q.element_size()
    shape = f"B{ARGS.batch} ctx{ARGS.context} {heads}q/{kv_heads}kv x{dim} bs{ARGS.block_size}"
    return measure(
        "gqa", shape, kv_bytes + io_bytes, triton_run, expected, GQA_SWEEP, deadline,
        lambda: reference.paged_attention(q, k_cache, v_cache, meta, scale), sdpa_run,
    )  # fmt: skip


def mla_workload(name: str, heads: int, topk: int | None, dtype: torch.dtype, deadline: float) -> dict:
    rank, rope = (512, 64) if not ARGS.smoke else (32, 16)
    heads = heads if not ARGS.smoke else 4
    meta, num_blocks, seq_lens = decode_batch(ARGS.batch, ARGS.context, ARGS.block_size, seed=1)
    torch.manual_seed(1)
    cache = torch.randn(num_blocks, ARGS.block_size, rank + rope, dtype=dtype, device=DEVICE)
    q_nope = torch.randn(ARGS.batch, heads, rank, dtype=dtype, device=DEVICE)
    q_pe = torch.randn(ARGS.batch, heads, rope, dtype=dtype, device=DEVICE)
    scale = (rank + rope) ** -0.5 if topk is None else 4 * (rank + rope) ** -0.5
    indices = None
    visible = sum(seq_lens)
    if topk is not None:
        k = min(topk, min(seq_lens))
        rows = [torch.randperm(n, device=DEVICE)[:k].sort().values for n in seq_lens]
        indices = torch.stack(rows).to(torch.int32)
        visible = k * ARGS.batch
    (view,) = meta.views
    out = torch.empty_like(q_nope)

    def triton_run(**config) -> torch.Tensor:
        mla_group(q_nope, q_pe, cache, out, view, scale, indices, **config)
        return out

    group = meta.groups[0]
    latent = metadata.gather_kv(cache, group)[:, None]  # [B, 1, L, rank + rope]
    q_full = torch.cat([q_nope, q_pe], -1)[:, :, None]
    mask = group.kv_mask
    if indices is not None:
        mask = torch.zeros_like(group.kv_mask).scatter_(-1, indices.long()[:, None, None], True)

    def sdpa_run() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_full, latent, latent[..., :rank], attn_mask=mask, scale=scale, enable_gqa=True
        )

    expected = reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale, indices)
    row_bytes = visible * (rank + rope) * cache.element_size()
    io_bytes = (q_nope.numel() * 2 + q_pe.numel()) * q_nope.element_size()
    shape = f"B{ARGS.batch} ctx{ARGS.context} {heads}h latent {rank}+{rope} bs{ARGS.block_size}"
    if topk is not None:
        shape += f" top{topk}"
    return measure(
        name, shape, row_bytes + io_bytes, triton_run, expected, MLA_SWEEP, deadline,
        lambda: reference_mla_attention(q_nope, q_pe, cache, meta, scale, indices), sdpa_run,
    )  # fmt: skip


def measure(name, shape, nbytes, triton_run, expected, space, deadline, reference_run, sdpa_run) -> dict:
    result = {
        "workload": name,
        "shape": shape,
        "bytes": nbytes,
        "max_abs_err": check_close(triton_run(), expected),
    }
    result["triton_default_s"] = bench(triton_run)
    if not ARGS.quick:
        result["sweep"] = sweep(triton_run, space, expected, deadline)
    result["reference_s"] = bench(reference_run)
    result["sdpa_gathered_s"] = bench(sdpa_run)
    return result


def summarize(result: dict, copy_bw: float) -> None:
    best = (result.get("sweep") or {}).get("best")
    if best is None or best["seconds"] >= result["triton_default_s"]:
        best = {"config": "default", "seconds": result["triton_default_s"]}
    result["triton_best"] = best
    result["triton_best_s"] = best["seconds"]
    for key in ("triton_default", "triton_best", "reference", "sdpa_gathered"):
        bandwidth = result["bytes"] / result[f"{key}_s"]
        result[f"{key}_gbs"] = bandwidth / 1e9
        result[f"{key}_of_copy"] = bandwidth / copy_bw
    result["meets_target"] = result["triton_best_of_copy"] >= TARGET


def _cell(r: dict, key: str) -> str:
    return f"{r[f'{key}_s'] * 1e6:.0f} us, {r[f'{key}_gbs']:.0f} GB/s ({r[f'{key}_of_copy']:.0%})"


def table(results: dict) -> str:
    lines = [
        f"Copy bandwidth: {results['copy_bandwidth_gbs']:.0f} GB/s ({results['machine']['gpu']}, {results['dtype']})",
        "",
        "| workload | shape | MB | Triton default | Triton best (config) | reference gather+SDPA | SDPA on gathered |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["workloads"]:
        config = ", ".join(f"{k}={v}" for k, v in r["triton_best"].items() if k != "seconds")

        lines.append(
            f"| {r['workload']} | {r['shape']} | {r['bytes'] / 1e6:.0f} | {_cell(r, 'triton_default')} | "
            f"{_cell(r, 'triton_best')} ({config}) | {_cell(r, 'reference')} | {_cell(r, 'sdpa_gathered')} |"
        )
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "triton": triton.__version__}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, memory_gb=props.total_memory / 1e9,
                    cuda=torch.version.cuda)  # fmt: skip
    else:
        info["gpu"] = "none (Triton interpreter on CPU, --smoke)"
    return info


def main() -> dict:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    if ARGS.smoke:
        ARGS.batch, ARGS.context, ARGS.topk, ARGS.budget_s = 3, 70, 24, min(ARGS.budget_s, 20.0)
    dtype = getattr(torch, ARGS.dtype)
    started = time.monotonic()
    deadline = started + ARGS.budget_s
    results = {
        "benchmark": "kernels",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": git_commit(),
        "machine": machine(),
        "backend": "native",
        "profile": ARGS.profile,
        "dtype": ARGS.dtype,
        "target_of_copy": TARGET,
        "copy_bandwidth_gbs": copy_bandwidth() / 1e9,
    }
    plan = [
        lambda d: gqa_workload(dtype, d),
        lambda d: mla_workload("mla16", 16, None, dtype, d),
        lambda d: mla_workload("mla64", 64, None, dtype, d),
        lambda d: mla_workload("dsa64", 64, ARGS.topk, dtype, d),
    ]
    workloads = []
    for i, run in enumerate(plan):  # share the sweep budget fairly among what is left
        workloads.append(run(time.monotonic() + (deadline - time.monotonic()) / (len(plan) - i)))
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
    for r in workloads:
        summarize(r, results["copy_bandwidth_gbs"] * 1e9)
    results["workloads"] = workloads
    results["meets_target"] = all(r["meets_target"] for r in workloads)
    results["wall_s"] = time.monotonic() - started
    out_dir = Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(
        f"\nwrote {path} in {results['wall_s']:.0f} s; decode >= {TARGET:.0%} of copy: {results['meets_target']}"
    )
    return results


if __name__ == "__main__":
    main()
