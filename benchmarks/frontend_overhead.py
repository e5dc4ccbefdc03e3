"""Front-end overhead: output tokens/s at concurrency 16 through HTTP (`python -m server.cli serve` as a
subprocess, streamed /v1/completions) against the same requests sent to the engine in-process
(NativeEngine.generate), in one run. Target: HTTP / in-process >= 0.9 (the front end costs under 10%).

Both sides use configs/cpu.yaml's engine settings and the same token-id prompts (random, seeded; greedy,
ignore_eos, so both generate exactly the same number of tokens). Both engines stay loaded and the two
paths alternate in rounds (benchmarks/bench/alternating.py) so that drift on a shared host falls on both;
the figure is the median over rounds of the round's HTTP / in-process tokens/s (the pooled ratio, total
tokens over total time, is recorded too). The HTTP side includes the client's own work (SSE parsing in
this process), as a real client would have it.

    python benchmarks/frontend_overhead.py [--requests 32] [--concurrency 16] [--rounds 4] [--update-results-md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench import alternating  # noqa: E402
from benchmarks.bench.loadgen import make_client  # noqa: E402
from benchmarks.bench.servers import ManagedServer, git_commit, glm_serve_spec, machine_info  # noqa: E402

TARGET = 0.9


def make_prompts(
    n: int, input_len: int, output_len: int, vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lens = [rng.randint(input_len * 3 // 4, input_len * 5 // 4) for _ in range(n)]
    return [([rng.randrange(100, vocab) for _ in range(k)], output_len) for k in lens]


async def run_in_process(engine, prompts, concurrency: int, tag: str) -> tuple[list[int], float]:
    from server.engine_api import GenerateRequest
    from server.scheduler.request import SamplingParams

    async def one(item):
        index, (ids, max_tokens) = item
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        n = 0
        async for delta in engine.generate(GenerateRequest(f"{tag}-{index}", ids, params)):
            n = delta.num_output_tokens
        return n

    return await alternating.gated(list(enumerate(prompts)), concurrency, one)


async def run_http(base_url: str, model: str, prompts, concurrency: int) -> tuple[list[int], float]:
    async with make_client() as client:

        async def one(item):
            ids, max_tokens = item
            body = {
                "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            return (await alternating.stream_timed(client, f"{base_url}/v1/completions", body)).output_tokens

        return await alternating.gated(prompts, concurrency, one)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="in-process/HTTP rounds, alternated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="cpu", help="profile for both sides")
    p.add_argument("--note", help="recorded with the result (e.g. 'machine shared')")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frontend_overhead"))
    p.add_argument(
        "--update-results-md", action="store_true", help="write the result into benchmarks/RESULTS.md"
    )
    args = p.parse_args(argv)

    from server.config import load_config
    from server.engine import NativeEngine

    cfg = load_config(args.config)
    engine = NativeEngine(cfg.engine)
    engine.load_model()
    from backends.loader import resolve_model_dir

    vocab = json.loads((resolve_model_dir(cfg.engine.model) / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.requests, args.input_len, args.output_len, vocab, args.seed)
    warm = make_prompts(args.concurrency, 32, 8, vocab, args.seed + 1)
    expected = sum(n for _, n in prompts)
    spec = glm_serve_spec(args.config, None)
    runs: list[dict] = []

    async def session(server: ManagedServer) -> None:
        async def in_process(number: int) -> dict:
            counts, secs = await run_in_process(engine, prompts, args.concurrency, f"r{number}")
            return {"output_tokens": sum(counts), "seconds": secs}

        async def http(number: int) -> dict:
            counts, secs = await run_http(spec.base_url, server.model_id or "", prompts, args.concurrency)
            return {"output_tokens": sum(counts), "seconds": secs}

        await engine.start()
        try:
            await run_in_process(engine, warm, args.concurrency, "warm")
            await run_http(spec.base_url, server.model_id or "", warm, args.concurrency)
            arms = [("in_process", in_process), ("http", http)]
            runs.extend(
                await alternating.alternate(
                    arms, args.rounds, lambda r: f"{_tok_s(r):.1f} out tok/s ({r['seconds']:.1f} s)"
                )
            )
        finally:
            await engine.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ManagedServer(spec, out / "server.log") as server:
        asyncio.run(session(server))

    totals = {
        arm: (
            sum(r["output_tokens"] for r in runs if r["arm"] == arm),
            sum(r["seconds"] for r in runs if r["arm"] == arm),
        )
        for arm in ("in_process", "http")
    }
    tok_s = {arm: tokens / secs for arm, (tokens, secs) in totals.items()}
    pooled = tok_s["http"] / tok_s["in_process"]
    ratios = alternating.round_ratios(runs, _tok_s, ("http", "in_process"))
    ratio = statistics.median(ratios)
    for arm, (tokens, _) in totals.items():
        if tokens != expected * args.rounds:
            print(f"{arm}: {tokens} output tokens, expected {expected * args.rounds}", file=sys.stderr)
            return 1
    result = {
        "benchmark": "frontend_overhead",
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "commit": git_commit(),
        "machine": machine_info(),
        "profile": args.config,
        "engine_backend": cfg.engine.backend,
        "note": args.note,
        "workload": vars(args) | {"output_tokens_per_pass": expected},
        "runs": runs,
        "in_process_output_throughput": tok_s["in_process"],
        "http_output_throughput": tok_s["http"],
        "http_over_in_process_pooled": pooled,
        "round_ratios": ratios,
        "http_over_in_process": ratio,  # the median of the round ratios
        "target": TARGET,
        "met": ratio >= TARGET,
    }
    path = out / f"frontend_overhead_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"in-process {tok_s['in_process']:.1f} tok/s, HTTP {tok_s['http']:.1f} tok/s: HTTP/in-process, median of "
        f"{len(ratios)} rounds {ratio:.3f}, pooled {pooled:.3f} (target >= {TARGET}) -> {path}"
    )
    if args.update_results_md:
        alternating.update_results_md("frontend-overhead", results_md_section(result))
    return 0


def _tok_s(run: dict) -> float:
    return run["output_tokens"] / run["seconds"]


def results_md_section(result: dict) -> str:
    w = result["workload"]
    lines = [
        alternating.run_header(result),
        f"{w['requests']} requests x {w['rounds']} rounds per path at concurrency {w['concurrency']}, prompts "
        f"{w['input_len']} tokens +-25%, {w['output_len']} output tokens each (greedy, ignore_eos).",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    lines += [
        "",
        "| path | round | output tokens | seconds | out tok/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['arm']} | {r['round']} | {r['output_tokens']} | {r['seconds']:.1f} | {_tok_s(r):.1f} |"
            for r in result["runs"]
        ),
        "",
        f"HTTP / in-process, median of the round ratios: **{result['http_over_in_process']:.3f}** (target >= "
        f"{result['target']}: {'met' if result['met'] else 'NOT met'}); pooled {result['http_over_in_process_pooled']:.3f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
