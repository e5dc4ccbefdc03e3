"""How the cpu profile's batch limits were chosen: the native engine on the embedded SmolLM2 (fp32) with
max_num_seqs x max_num_batched_tokens swept, every setting on the same requests, settings run in
round-robin rounds so that a load swing on a shared host falls on all of them.

Workload: --num-requests (256) requests submitted at once (a backlog deeper than any setting's batch),
prompts of 32..256 random tokens, 8..32 output tokens (EOS ignored), fixed seed. Per setting: output
tok/s (all output tokens / wall time), TTFT p50 (submission to first token) and TPOT p50 (per request,
(end - first token) / (tokens - 1)), each the median over rounds. The rule configs/cpu.yaml follows: the
setting with the highest output throughput whose TPOT p50 stays within the cpu suite's interactive SLO
(--tpot-slo-ms, 250: benchmarks/suites/cpu.yaml's goodput).

    python benchmarks/cpu_batch_limits.py [--rounds 2] [--seqs 64 128 256] [--tokens 2048 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.offline_throughput import cpu_model, git_commit, make_workload  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine import NativeEngine  # noqa: E402
from server.engine_api import GenerateRequest  # noqa: E402
from server.scheduler.request import SamplingParams  # noqa: E402


def run_setting(model_dir: Path, work, max_num_seqs: int, max_num_batched_tokens: int, threads: int) -> dict:
    """One pass of the workload through an engine with these limits."""
    engine = NativeEngine(
        EngineConfig(
            model=str(model_dir),
            num_threads=threads,
            kv_cache_bytes=2 << 30,  # configs/cpu.yaml's
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            attention_kernel="cpu",
        )
    )
    engine.load_model()

    async def main() -> tuple[list[tuple[float, float, int]], float]:
        await engine.start()

        async def one(i: int) -> tuple[float, float, int]:
            params = SamplingParams(max_tokens=work.output_lens[i], temperature=0.0, ignore_eos=True)
            t0, first, n = time.perf_counter(), None, 0
            async for d in engine.generate(GenerateRequest(f"b{i}", work.prompts[i], params)):
                if d.token_ids and first is None:
                    first = time.perf_counter()
                n = d.num_output_tokens
            return first - t0, (time.perf_counter() - first) / max(1, n - 1), n

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
        elapsed = time.perf_counter() - t0
        await engine.shutdown()
        return done, elapsed

    done, elapsed = asyncio.run(main())
    return {
        "output_tok_s": sum(n for _, _, n in done) / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(t for t, _, _ in done),
        "tpot_p50_ms": 1000 * statistics.median(t for _, t, _ in done),
        "preemptions": engine.stats()["num_preemptions_total"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tpot-slo-ms", type=float, default=250.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="8 requests, two settings, one round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.rounds, args.seqs, args.tokens = 8, 1, [4, 8], [512]

    import torch

    from backends.loader import resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    output_range = (8, 16) if args.smoke else (8, 32)
    work = make_workload(args.num_requests, (32, 256), output_range, 49152, seed=0)
    settings = [(s, t) for s in args.seqs for t in args.tokens]
    runs: dict[tuple[int, int], list[dict]] = {k: [] for k in settings}
    for r in range(args.rounds):
        for setting in settings if r % 2 == 0 else settings[::-1]:  # ABC.. then ..CBA
            runs[setting].append(run_setting(model_dir, work, *setting, args.threads))
            print(
                f"round {r} max_num_seqs {setting[0]} max_num_batched_tokens {setting[1]}: {runs[setting][-1]}"
            )
    rows = []
    for (seqs, tokens), passes in runs.items():
        row = {"max_num_seqs": seqs, "max_num_batched_tokens": tokens, "passes": passes}
        for key in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms"):
            row[key] = statistics.median(x[key] for x in passes)
        rows.append(row)
    within = [r for r in rows if r["tpot_p50_ms"] <= args.tpot_slo_ms] or rows
    chosen = max(within, key=lambda r: r["output_tok_s"])
    results = {
        "benchmark": "cpu_batch_limits",
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "workload": {
            "num_requests": args.num_requests,
            "prompt_tokens": [32, 256],
            "output_tokens": output_range,
        },
        "tpot_slo_ms": args.tpot_slo_ms,
        "rows": rows,
        "chosen": {
            "max_num_seqs": chosen["max_num_seqs"],
            "max_num_batched_tokens": chosen["max_num_batched_tokens"],
        },
    }
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))
    print(table(results))
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"cpu_batch_limits_{time.strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return results


def table(results: dict) -> str:
    lines = [
        "| max_num_seqs | max_num_batched_tokens | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) |",
        "|---|---|---|---|---|",
    ]
    chosen = results["chosen"]
    for r in results["rows"]:
        mark = (
            " (chosen)" if (r["max_num_seqs"], r["max_num_batched_tokens"]) == tuple(chosen.values()) else ""
        )
        lines.append(
            f"| {r['max_num_seqs']}{mark} | {r['max_num_batched_tokens']} | {r['output_tok_s']:.1f} | "
            f"{r['ttft_p50_ms']:.0f} | {r['tpot_p50_ms']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
