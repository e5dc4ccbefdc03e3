"""The driver of the overhead benchmarks (benchmarks/frontend_overhead.py, routing_overhead.py): two arms
(say, without and with the feature) measured in rounds whose order alternates (A B, B A, A B, ...), so
that drift on a shared host falls on both arms alike, and the figure that resists the drift that is left:
the median over rounds of each round's ratio (a pooled ratio lets one slow pass of one arm decide)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench.client import RequestOutput, StreamTimer

Measure = Callable[[int], Awaitable[dict[str, Any]]]  # the round's number -> what one pass measured
RESULTS_MD = Path(__file__).resolve().parent.parent / "RESULTS.md"


async def alternate(
    arms: Sequence[tuple[str, Measure]], rounds: int, describe: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """Each arm once per round, the order reversed every other round; the passes as {arm, round, ...}."""
    runs: list[dict[str, Any]] = []
    for number in range(rounds):
        for arm, measure in arms if number % 2 == 0 else arms[::-1]:
            runs.append({"arm": arm, "round": number, **await measure(number)})
            print(f"{arm:>10} #{number}: {describe(runs[-1])}", flush=True)
    return runs


def round_ratios(
    runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float], arms: tuple[str, str]
) -> list[float]:
    """value(arms[0]'s pass) / value(arms[1]'s pass), round by round."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["arm"]] = run
    return [value(r[arms[0]]) / value(r[arms[1]]) for _, r in sorted(by_round.items())]


async def gated(
    items: Sequence[Any], concurrency: int, fn: Callable[[Any], Awaitable[Any]]
) -> tuple[list[Any], float]:
    """fn over the items, at most `concurrency` at once: (results in order, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> Any:
        async with gate:
            return await fn(item)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(item) for item in items))
    return list(results), time.perf_counter() - started


async def stream_timed(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> RequestOutput:
    """One streamed request (OpenAI SSE), timed by the client; RuntimeError unless it succeeded."""
    out = RequestOutput(start_time=time.perf_counter())
    timer = StreamTimer(out)
    async with client.stream("POST", url, json=body, headers=headers or {}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                timer.feed(line[5:].strip())
    if not timer.finish().success:
        raise RuntimeError(f"request failed: {out.error}")
    return out


def run_header(result: dict[str, Any]) -> str:
    """The first line of a RESULTS.md section: when, which commit, which machine and how loaded."""
    m = result["machine"]
    return (
        f"Run {result['date']}, commit `{result['commit']}`, {m['cpu']} ({m['cpu_count']} logical CPUs, load "
        f"average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}), profile `{result['profile']}`."
    )


def update_results_md(name: str, section: str) -> None:
    """Replace the text between `<!-- {name}:start -->` and `<!-- {name}:end -->` in benchmarks/RESULTS.md."""
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS_MD.read_text()
    start, end = text.index(start_marker), text.index(end_marker)
    RESULTS_MD.write_text(text[: start + len(start_marker)] + "\n" + section + "\n" + text[end:])
