"""PNG plots of a suite run, one line per server: output throughput against load, and TTFT and TPOT
percentiles against load (p50 solid, p90 dashed, p99 dotted). Load is the concurrency level, or the
request rate for request-rate runs; each workload and kind of load gets its own figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLES = {50.0: "-", 90.0: "--", 99.0: ":"}


def _series(
    results: Sequence[dict[str, Any]], workload: str, by_rate: bool
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        rate = r["request_rate"]
        if r["workload"]["name"] != workload or (rate != "inf") != by_rate:
            continue
        out.setdefault(r["label"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: _x(r, by_rate))
    return out


def _x(r: dict[str, Any], by_rate: bool) -> float:
    return float(r["request_rate"]) if by_rate else float(r["max_concurrency"] or math.inf)


def _figure(title: str, xlabel: str, ylabel: str, log_x: bool, xs: Sequence[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log", base=2)
    ticks = sorted(x for x in xs if math.isfinite(x))
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def plot_workload(
    results: Sequence[dict[str, Any]], workload: str, out_dir: Path, percentiles: Sequence[float]
) -> list[Path]:
    paths: list[Path] = []
    for by_rate in (False, True):
        series = _series(results, workload, by_rate)
        if not series:
            continue
        kind, xlabel = ("rate", "request rate (req/s)") if by_rate else ("concurrency", "concurrency")
        xs_all = {_x(r, by_rate) for rows in series.values() for r in rows}
        if len(xs_all) < 2:
            continue  # one load point: a table says it better than a plot
        log_x = not by_rate and len(xs_all) > 2
        plt, fig, ax = _figure(f"{workload}: output throughput", xlabel, "output tokens/s", log_x, xs_all)
        for label, rows in series.items():
            ax.plot(
                [_x(r, by_rate) for r in rows],
                [r["output_throughput"] for r in rows],
                marker="o",
                label=label,
            )
        ax.legend(fontsize=8)
        paths.append(_save(plt, fig, out_dir / f"{workload}_{kind}_throughput.png"))
        for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT")):
            plt, fig, ax = _figure(f"{workload}: {name} percentiles", xlabel, f"{name} (ms)", log_x, xs_all)
            for i, (label, rows) in enumerate(series.items()):
                color = f"C{i}"
                for p in percentiles:
                    key = f"median_{metric}_ms" if p == 50 else f"p{int(p) if int(p) == p else p}_{metric}_ms"
                    ys = [r.get(key, r.get(f"p50_{metric}_ms")) for r in rows]
                    ax.plot(
                        [_x(r, by_rate) for r in rows], ys, color=color, linestyle=STYLES.get(p, "-."),
                        marker="o", markersize=3, label=f"{label} p{p:g}",
                    )  # fmt: skip
            ax.legend(fontsize=7)
            paths.append(_save(plt, fig, out_dir / f"{workload}_{kind}_{metric}.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(results: Sequence[dict[str, Any]], out_dir: Path, percentiles: Sequence[float]) -> list[Path]:
    workloads = list(dict.fromkeys(r["workload"]["name"] for r in results))
    return [p for w in workloads for p in plot_workload(results, w, out_dir, percentiles)]
