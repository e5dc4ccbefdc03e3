"""The overhead benchmarks' driver (benchmarks/bench/alternating.py): arms alternate A B, B A, ... and the
figure is the median of the per-round ratios, which one slow pass cannot move."""

from __future__ import annotations

import asyncio
import statistics

from benchmarks.bench.alternating import alternate, round_ratios


def test_rounds_alternate_and_a_slow_pass_moves_one_round_ratio_only():
    order: list[str] = []

    def arm(name: str, slow_round: int | None = None):
        async def measure(number: int) -> dict:
            order.append(name)
            return {"ttft": 10.0 if number == slow_round else 1.0}

        return measure

    runs = asyncio.run(alternate([("off", arm("off")), ("on", arm("on", slow_round=2))], 5, lambda r: ""))
    assert order == ["off", "on", "on", "off", "off", "on", "on", "off", "off", "on"]
    assert [(r["arm"], r["round"]) for r in runs[:4]] == [("off", 0), ("on", 0), ("on", 1), ("off", 1)]
    ratios = round_ratios(runs, lambda r: r["ttft"], ("on", "off"))
    assert ratios == [1.0, 1.0, 10.0, 1.0, 1.0] and statistics.median(ratios) == 1.0
