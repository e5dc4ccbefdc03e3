"""CPU hot ops of the native engine against what they replace, at the embedded model's shapes.

- decode attention: glm_kernels/cpu_paged.py's C++ kernel against glm_kernels/reference.py (gather + SDPA), over a
  paged cache with shuffled blocks; achieved bandwidth (bytes of K/V read once) against a measured read
  bandwidth of the same size;
- linear layers: glm_kernels/cpu_linear.py (oneDNN, pre-packed weight) against F.linear (MKL sgemm).

All in one process, one after the other, so the ratios are comparable. Writes JSON under
benchmarks/results/ and prints a markdown table (benchmarks/KERNELS.md keeps the runs).

    python benchmarks/cpu_kernels.py [--threads 2] [--batch 64] [--context 200 700]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.offline_throughput import cpu_model, git_commit  # noqa: E402
from glm_kernels import cpu_linear, cpu_paged  # noqa: E402
from glm_kernels.metadata import build_step_metadata  # noqa: E402
from glm_kernels.reference import paged_attention  # noqa: E402

# SmolLM2-135M: 9 query heads, 3 KV heads x 64, hidden 576, intermediate 1536, vocabulary 49152.
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
LINEARS = {"qkv": (576, 960), "o_proj": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
LM_HEAD = (576, 49152)


MIN_TIME = {"s": 0.5}  # seconds of repeats per measurement (--min-time)


def bench(fn, min_time: float | None = None) -> float:
    """Median seconds per call over repeats filling about min_time."""
    min_time = MIN_TIME["s"] if min_time is None else min(min_time, MIN_TIME["s"])
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    times = []
    for _ in range(max(3, int(min_time / once))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def read_bandwidth(nbytes: int) -> float:
    x = torch.ones(nbytes // 4)
    return nbytes / bench(lambda: x.sum())


def decode_attention(batch: int, context: tuple[int, int], block_size: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    lens = [rng.randint(*context) for _ in range(batch)]
    num_blocks = sum(n // block_size + 1 for n in lens)
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, used = [], 0
    for n in lens:
        count = n // block_size + 1
        tables.append(order[used : used + count])
        used += count
    step = build_step_metadata(lens, [1] * batch, tables, block_size)  # each decodes token `n` after n cached
    meta = cpu_paged.build_cpu_metadata(step)  # the groups for the reference, the rows for the C++ kernel
    k = torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    expected = paged_attention(q, k, v, meta, scale)
    torch.testing.assert_close(cpu_paged.paged_attention(q, k, v, meta, scale), expected)
    nbytes = 2 * (sum(lens) + batch) * KV_HEADS * HEAD_DIM * 4
    t_ref = bench(lambda: paged_attention(q, k, v, meta, scale))
    t_cpu = bench(lambda: cpu_paged.paged_attention(q, k, v, meta, scale))
    read_bw = read_bandwidth(nbytes)
    return {
        "batch": batch,
        "context": list(context),
        "kv_bytes": nbytes,
        "reference_ms": t_ref * 1e3,
        "cpu_ms": t_cpu * 1e3,
        "speedup": t_ref / t_cpu,
        "cpu_gb_s": nbytes / t_cpu / 1e9,
        "read_gb_s": read_bw / 1e9,
        "fraction_of_read_bandwidth": nbytes / t_cpu / read_bw,
    }


def linears(rows: list[int]) -> list[dict]:
    out = []
    for name, (k, n) in {**LINEARS, "lm_head": LM_HEAD}.items():
        w = torch.randn(n, k)
        packed = cpu_linear.pack(w)
        for m in rows:
            x = torch.randn(m, k)
            torch.testing.assert_close(cpu_linear.linear(x, packed), F.linear(x, w), rtol=1e-4, atol=1e-3)
            t_mkl = bench(lambda x=x, w=w: F.linear(x, w), 0.3)
            t_dnnl = bench(lambda x=x, packed=packed: cpu_linear.linear(x, packed), 0.3)
            out.append(
                {
                    "layer": name,
                    "rows": m,
                    "f_linear_ms": t_mkl * 1e3,
                    "onednn_ms": t_dnnl * 1e3,
                    "speedup": t_mkl / t_dnnl,
                    "onednn_gflops": 2 * m * k * n / t_dnnl / 1e9,
                }
            )
    return out


def table(result: dict) -> str:
    a = result["decode_attention"]
    lines = [
        f"Decode attention, batch {a['batch']}, contexts {a['context'][0]}-{a['context'][1]}, "
        f"{a['kv_bytes'] / 1e6:.1f} MB of K/V per layer:",
        "",
        "| reference (gather + SDPA) | cpu kernel | speedup | cpu kernel GB/s | read bandwidth GB/s | fraction |",
        "|---|---|---|---|---|---|",
        f"| {a['reference_ms']:.2f} ms | {a['cpu_ms']:.2f} ms | {a['speedup']:.2f}x | {a['cpu_gb_s']:.1f} | "
        f"{a['read_gb_s']:.1f} | {a['fraction_of_read_bandwidth']:.0%} |",
        "",
        "| linear | rows | F.linear ms | oneDNN packed ms | speedup | oneDNN GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["linears"]:
        lines.append(
            f"| {r['layer']} | {r['rows']} | {r['f_linear_ms']:.2f} | {r['onednn_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['onednn_gflops']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, nargs=2, default=(200, 700))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rows", type=int, nargs="+", default=[4, 64, 512])
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    MIN_TIME["s"] = args.min_time
    torch.set_num_threads(args.threads)
    cpu_paged.load()
    result = {
        "benchmark": "cpu_kernels",
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "decode_attention": decode_attention(args.batch, tuple(args.context), args.block_size),
        "linears": linears(args.rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_kernels_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
