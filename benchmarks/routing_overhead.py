"""Shadow overhead: the primary's TTFT p50 at concurrency 16 with shadowing off (weight 0) and on (weight
100: every request also mirrored to the candidate), in one run. Target: on / off <= 1.05.

The front is a `python -m server.cli serve` subprocess on the cpu profile (the real engine is the primary,
target `local`) with routing in shadow mode towards a candidate upstream: a second glm-serve subprocess
serving the test double tests.fake_engine:FakeEngine (its compute is not this host's in production; the
double keeps it off the primary's CPU). The weight is switched through POST /admin/routing between passes,
and passes alternate in rounds (off, on; on, off; ...: benchmarks/bench/alternating.py) so that drift on a
shared host falls on both; each pass has fresh prompts (no prefix-cache hits), after one untimed warm-up
pass. TTFT is measured by the client (first content chunk of a streamed /v1/chat/completions). The
figure is the median over rounds of the round's on / off TTFT p50: many short rounds, so that a load swing
during one pass moves one round's ratio, not the result (the pooled p50 ratio is recorded too).

    python benchmarks/routing_overhead.py [--requests 16] [--concurrency 16] [--rounds 16] [--update-results-md]
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

from benchmarks.bench import alternating  # noqa: E402
from benchmarks.bench.loadgen import make_client  # noqa: E402
from benchmarks.bench.servers import ManagedServer, ServerSpec, free_port, git_commit, machine_info  # noqa: E402

TARGET = 1.05
MODEL = "bench-model"
ADMIN_KEY = "sk-bench-admin"
WORDS = "river stone cloud lamp garden window orange quiet engine paper music valley letter bridge".split()


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def run_pass(base_url: str, texts: list[str], concurrency: int, max_tokens: int) -> list[float]:
    """Client TTFTs of one pass (every request must succeed)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with make_client() as client:

        async def one(text: str) -> float:
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
            return (
                await alternating.stream_timed(client, f"{base_url}/v1/chat/completions", body, headers)
            ).ttft

        return (await alternating.gated(texts, concurrency, one))[0]


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
    p.add_argument("--requests", type=int, default=16, help="per pass")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--words", type=int, default=40, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--rounds", type=int, default=16, help="off/on rounds, alternated")
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
    machine = machine_info()

    def arm(weight: int):
        async def measure(number: int) -> dict:
            await asyncio.to_thread(set_weight, front.base_url, weight)
            seed = args.seed + 2 * number + (weight > 0)  # fresh prompts each pass: no prefix-cache hits
            texts = prompts(args.requests, args.words, seed)
            ttfts = await run_pass(front.base_url, texts, args.concurrency, args.max_tokens)
            return {"shadow_weight": weight, "ttft_p50_s": statistics.median(ttfts), "ttfts_s": ttfts}

        return measure

    async def session() -> list[dict]:
        await asyncio.to_thread(set_weight, front.base_url, 100)  # warm-up: both paths, untimed
        await run_pass(front.base_url, prompts(args.requests, args.words, -1), args.concurrency, 4)
        arms = [("off", arm(0)), ("on", arm(100))]
        return await alternating.alternate(
            arms, args.rounds, lambda r: f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms"
        )

    with ManagedServer(candidate, out_dir / "candidate.log"), ManagedServer(front, out_dir / "front.log"):
        runs = asyncio.run(session())
        time.sleep(2)  # the last shadows end
        shadows = shadow_counts(front.base_url)
    p50 = {
        w: statistics.median([t for r in runs if r["arm"] == w for t in r["ttfts_s"]]) for w in ("off", "on")
    }
    pooled = p50["on"] / p50["off"]
    ratios = alternating.round_ratios(runs, lambda r: r["ttft_p50_s"], ("on", "off"))
    ratio = statistics.median(ratios)
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
        "ttft_p50_off_s": p50["off"],
        "ttft_p50_on_s": p50["on"],
        "on_over_off_pooled": pooled,
        "round_ratios": ratios,
        "on_over_off": ratio,  # the median of the round ratios
        "target": TARGET,
        "met": ratio <= TARGET,
    }
    path = out_dir / f"routing_overhead_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"TTFT p50 off {p50['off'] * 1000:.0f} ms, on {p50['on'] * 1000:.0f} ms: on/off, median of {len(ratios)} "
        f"rounds {ratio:.3f}, pooled {pooled:.3f} (target <= {TARGET})"
    )
    if args.update_results_md:
        alternating.update_results_md("routing-overhead", results_md_section(result))
    return 0


def results_md_section(result: dict) -> str:
    w = result["workload"]
    lines = [
        alternating.run_header(result),
        f"{w['requests']} streamed chat requests per pass at concurrency {w['concurrency']}, prompts of {w['words']} "
        f"words, {w['max_tokens']} output tokens; {w['rounds']} off/on rounds, alternated. "
        f"Shadow calls: {json.dumps(result['shadow_metrics'])}.",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    lines += [
        "",
        "| shadow weight | round | TTFT p50 (ms) |",
        "|---|---|---|",
        *(f"| {r['shadow_weight']} | {r['round']} | {r['ttft_p50_s'] * 1000:.0f} |" for r in result["runs"]),
        "",
        f"On / off TTFT p50, median of the {len(result['round_ratios'])} round ratios: **{result['on_over_off']:.3f}** "
        f"(target <= {result['target']}: {'met' if result['met'] else 'NOT met'}); pooled over all passes: off "
        f"{result['ttft_p50_off_s'] * 1000:.0f} ms, on {result['ttft_p50_on_s'] * 1000:.0f} ms, "
        f"{result['on_over_off_pooled']:.3f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
