"""Shadow overhead: the primary's TTFT p50 at concurrency 16 with shadowing off (weight 0) and on (weight
100: every request also mirrored to the candidate), in one run. Target: on / off <= 1.05.

The front is a `python -m server.cli serve` subprocess on the cpu profile (the real engine is the primary,
target `local`) with routing in shadow mode towards a candidate upstream: a second glm-serve subprocess
serving the test double tests.fake_engine:FakeEngine (its compute is not this host's in production; the
double keeps it off the primary's CPU). The weight is switched through POST /admin/routing between passes,
and passes alternate (off, on, on, off, ...) so that drift on a shared host falls on both; each pass has
fresh prompts (no prefix-cache hits), after one untimed warm-up pass. TTFT is measured
by the client (first content chunk of a streamed /v1/chat/completions).

    python benchmarks/routing_overhead.py [--requests 32] [--concurrency 16] [--repeats 2] [--update-results-md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.client import RequestOutput, StreamTimer  # noqa: E402
from benchmarks.bench.loadgen import make_client  # noqa: E402
from benchmarks.bench.servers import ManagedServer, ServerSpec, free_port, git_commit, machine_info  # noqa: E402

TARGET = 1.05
MODEL = "bench-model"
ADMIN_KEY = "sk-bench-admin"
WORDS = "river stone cloud lamp garden window orange quiet engine paper music valley letter bridge".split()
MARKERS = ("<!-- routing-overhead:start -->", "<!-- routing-overhead:end -->")


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def run_pass(base_url: str, texts: list[str], concurrency: int, max_tokens: int) -> list[float]:
    """Client TTFTs of one pass (every request must succeed)."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with make_client() as client:

        async def one(text: str) -> float:
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
            async with gate:
                out = RequestOutput(start_time=time.perf_counter())
                timer = StreamTimer(out)
                async with client.stream(
                    "POST", f"{base_url}/v1/chat/completions", json=body, headers=headers
                ) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            timer.feed(line[5:].strip())
                if not timer.finish().success:
                    raise RuntimeError(f"request failed: {out.error}")
                return out.ttft

        return list(await asyncio.gather(*(one(t) for t in texts)))


def set_weight(base_url: str, weight: float) -> None:
    response = httpx.post(f"{base_url}/admin/routing", json={"model": MODEL, "weight": weight},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)  # fmt: skip
    response.raise_for_status()


def shadow_counts(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("glm_serve:shadow_requests_total", "glm_serve:shadow_dropped_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def front_profile(workdir: Path, candidate_url: str, config: str) -> Path:
    from server.config import CONFIG_DIR

    profile = yaml.safe_load((CONFIG_DIR / f"{config}.yaml").read_text())
    profile.setdefault("server", {})["admin_keys"] = [ADMIN_KEY]
    profile["routing"] = {
        "enabled": True,
        "shadow_max_in_flight": 64,
        "targets": {"candidate": {"base_url": f"{candidate_url}/v1"}},
        "models": {MODEL: {"primary": "local", "candidate": "candidate", "mode": "shadow", "weight": 0}},
    }
    path = workdir / "front.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32, help="per pass")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--words", type=int, default=80, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="off/on pairs, alternated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="cpu")
    p.add_argument("--note", help="recorded with the result (e.g. 'machine shared')")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing_overhead"))
    p.add_argument(
        "--update-results-md", action="store_true", help="write the result into benchmarks/RESULTS.md"
    )
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    env = {"GLM_SERVE_STATE_DIR": str(workdir), "GLM_FAKE_TOKEN_DELAY_S": "0.02"}
    cport, fport = free_port(), free_port()
    candidate = ServerSpec("candidate", "fake", [sys.executable, "-m", "server.cli", "serve", "--port", str(cport),
                           "--served-model-name", MODEL, "--engine-factory", "tests.fake_engine:FakeEngine",
                           "--log-level", "warning"], env=env, base_url=f"http://127.0.0.1:{cport}")  # fmt: skip
    profile = front_profile(workdir, candidate.base_url, args.config)
    front = ServerSpec("front", "native", [sys.executable, "-m", "server.cli", "serve", "--config", str(profile),
                       "--port", str(fport), "--served-model-name", MODEL, "--log-level", "warning"],
                       env=env, base_url=f"http://127.0.0.1:{fport}", api_key=ADMIN_KEY)  # fmt: skip
    runs: list[dict] = []
    machine = machine_info()
    with ManagedServer(candidate, out_dir / "candidate.log"), ManagedServer(front, out_dir / "front.log"):
        set_weight(front.base_url, 100)  # warm-up: both paths, every prompt shape, untimed
        asyncio.run(run_pass(front.base_url, prompts(args.requests, args.words, -1), args.concurrency, 4))
        for rep in range(args.repeats):
            order = (0, 100) if rep % 2 == 0 else (100, 0)
            for weight in order:
                set_weight(front.base_url, weight)
                texts = prompts(
                    args.requests, args.words, args.seed + len(runs)
                )  # fresh: no prefix-cache hits
                ttfts = asyncio.run(run_pass(front.base_url, texts, args.concurrency, args.max_tokens))
                runs.append({"shadow_weight": weight, "repeat": rep, "ttft_p50_s": statistics.median(ttfts),
                             "ttfts_s": ttfts})  # fmt: skip
                print(
                    f"weight {weight:>3} #{rep}: TTFT p50 {runs[-1]['ttft_p50_s'] * 1000:.0f} ms", flush=True
                )
        time.sleep(2)  # the last shadows end
        shadows = shadow_counts(front.base_url)
    p50 = {
        w: statistics.median([t for r in runs if r["shadow_weight"] == w for t in r["ttfts_s"]])
        for w in (0, 100)
    }
    ratio = p50[100] / p50[0]
    pairs = [(on["ttft_p50_s"] / off["ttft_p50_s"]) for off, on in _pairs(runs)]
    result = {
        "benchmark": "routing_overhead",
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "commit": git_commit(),
        "machine": machine,
        "profile": args.config,
        "note": args.note,
        "workload": vars(args),
        "runs": runs,
        "shadow_metrics": shadows,
        "ttft_p50_off_s": p50[0],
        "ttft_p50_on_s": p50[100],
        "on_over_off": ratio,
        "pair_ratios": pairs,
        "pair_ratio_median": statistics.median(pairs),
        "target": TARGET,
        "met": ratio <= TARGET,
    }
    path = out_dir / f"routing_overhead_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"TTFT p50 off {p50[0] * 1000:.0f} ms, on {p50[100] * 1000:.0f} ms: on/off {ratio:.3f} (target <= {TARGET})"
    )
    if args.update_results_md:
        update_results_md(result)
    return 0


def _pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """(off, on) runs of each repeat."""
    by_repeat: dict[int, dict[int, dict]] = {}
    for run in runs:
        by_repeat.setdefault(run["repeat"], {})[run["shadow_weight"]] = run
    return [(r[0], r[100]) for r in by_repeat.values()]


def update_results_md(result: dict) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text()
    start, end = text.index(MARKERS[0]), text.index(MARKERS[1])
    path.write_text(text[: start + len(MARKERS[0])] + "\n" + results_md_section(result) + "\n" + text[end:])


def results_md_section(result: dict) -> str:
    w, m = result["workload"], result["machine"]
    lines = [
        f"Run {result['date']}, commit `{result['commit']}`, {m['cpu']} ({m['cpu_count']} logical CPUs, load average "
        f"at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}), profile `{result['profile']}`.",
        f"{w['requests']} streamed chat requests per pass at concurrency {w['concurrency']}, prompts of {w['words']} "
        f"words, {w['max_tokens']} output tokens; {w['repeats']} off/on pairs, alternated. "
        f"Shadow calls: {json.dumps(result['shadow_metrics'])}.",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    lines += [
        "",
        "| shadow weight | pass | TTFT p50 (ms) |",
        "|---|---|---|",
        *(f"| {r['shadow_weight']} | {r['repeat']} | {r['ttft_p50_s'] * 1000:.0f} |" for r in result["runs"]),
        "",
        f"TTFT p50 over all passes: off {result['ttft_p50_off_s'] * 1000:.0f} ms, on {result['ttft_p50_on_s'] * 1000:.0f} "
        f"ms; on / off **{result['on_over_off']:.3f}** (target <= {result['target']}: "
        f"{'met' if result['met'] else 'NOT met'}); median of the per-pair ratios {result['pair_ratio_median']:.3f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
