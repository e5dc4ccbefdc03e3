"""Front-end overhead: output tokens/s at concurrency 16 through HTTP (`python -m server.cli serve` as a
subprocess, streamed /v1/completions) against the same requests sent to the engine in-process
(NativeEngine.generate), in one run. Target: HTTP / in-process >= 0.9 (the front end costs under 10%).

Both sides use configs/cpu.yaml's engine settings and the same token-id prompts (random, seeded; greedy,
ignore_eos, so both generate exactly the same number of tokens). Both engines stay loaded and the two
paths alternate (in-process, HTTP, in-process, HTTP ...) so that drift on a shared host falls on both;
the ratio is total tokens over total time of each path. The HTTP side includes the client's own work
(SSE parsing in this process), as a real client would have it.

    python benchmarks/frontend_overhead.py [--requests 32] [--concurrency 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.client import RequestOutput, StreamTimer  # noqa: E402
from benchmarks.bench.loadgen import make_client  # noqa: E402
from benchmarks.bench.servers import ManagedServer, git_commit, glm_serve_spec, machine_info  # noqa: E402

TARGET = 0.9


def make_prompts(
    n: int, input_len: int, output_len: int, vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lens = [rng.randint(input_len * 3 // 4, input_len * 5 // 4) for _ in range(n)]
    return [([rng.randrange(100, vocab) for _ in range(k)], output_len) for k in lens]


async def _gated(items, concurrency: int, fn) -> tuple[list[int], float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(item):
        async with gate:
            return await fn(item)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(item) for item in items))
    return list(counts), time.perf_counter() - t0


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

    return await _gated(list(enumerate(prompts)), concurrency, one)


async def run_http(base_url: str, model: str, prompts, concurrency: int) -> tuple[list[int], float]:
    async with make_client() as client:

        async def one(item):
            ids, max_tokens = item
            body = {
                "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            out = RequestOutput(start_time=time.perf_counter())
            timer = StreamTimer(out)
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        timer.feed(line[5:].strip())
            if not timer.finish().success:
                raise RuntimeError(f"HTTP request failed: {out.error}")
            return out.output_tokens

        return await _gated(prompts, concurrency, one)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="in-process/HTTP pairs, alternated")
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
        await engine.start()
        try:
            await run_in_process(engine, warm, args.concurrency, "warm")
            await run_http(spec.base_url, server.model_id or "", warm, args.concurrency)
            for rep in range(args.repeats):
                counts, secs = await run_in_process(engine, prompts, args.concurrency, f"r{rep}")
                runs.append(
                    {"path": "in_process", "repeat": rep, "output_tokens": sum(counts), "seconds": secs}
                )
                counts, secs = await run_http(spec.base_url, server.model_id or "", prompts, args.concurrency)
                runs.append({"path": "http", "repeat": rep, "output_tokens": sum(counts), "seconds": secs})
                for r in runs[-2:]:
                    print(
                        f"{r['path']:>10} #{rep}: {r['output_tokens'] / r['seconds']:.1f} out tok/s ({r['seconds']:.1f} s)",
                        flush=True,
                    )
        finally:
            await engine.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ManagedServer(spec, out / "server.log") as server:
        asyncio.run(session(server))

    totals = {
        path: (
            sum(r["output_tokens"] for r in runs if r["path"] == path),
            sum(r["seconds"] for r in runs if r["path"] == path),
        )
        for path in ("in_process", "http")
    }
    tok_s = {path: tokens / secs for path, (tokens, secs) in totals.items()}
    ratio = tok_s["http"] / tok_s["in_process"]
    for path, (tokens, _) in totals.items():
        if tokens != expected * args.repeats:
            print(f"{path}: {tokens} output tokens, expected {expected * args.repeats}", file=sys.stderr)
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
        "http_over_in_process": ratio,
        "target": TARGET,
        "met": ratio >= TARGET,
    }
    path = out / f"frontend_overhead_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"in-process {tok_s['in_process']:.1f} tok/s, HTTP {tok_s['http']:.1f} tok/s: HTTP/in-process {ratio:.3f} (target >= {TARGET}) -> {path}"
    )
    return 0


def results_md_section(result: dict) -> str:
    w, m = result["workload"], result["machine"]
    lines = [
        f"Run {result['date']}, commit `{result['commit']}`, {m['cpu']} ({m['cpu_count']} logical CPUs, load average "
        f"at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}), profile `{result['profile']}`.",
        f"{w['requests']} requests x {w['repeats']} passes per path at concurrency {w['concurrency']}, prompts "
        f"{w['input_len']} tokens +-25%, {w['output_len']} output tokens each (greedy, ignore_eos).",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    lines += [
        "",
        "| path | pass | output tokens | seconds | out tok/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['path']} | {r['repeat']} | {r['output_tokens']} | {r['seconds']:.1f} | {r['output_tokens'] / r['seconds']:.1f} |"
            for r in result["runs"]
        ),
        "",
        f"HTTP / in-process: **{result['http_over_in_process']:.3f}** (target >= {result['target']}: "
        f"{'met' if result['met'] else 'NOT met'}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
