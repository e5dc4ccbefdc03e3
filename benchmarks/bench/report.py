"""summary.md of a suite run, and its section in benchmarks/RESULTS.md.

RESULTS.md keeps whatever else it holds: a run replaces only the text between its suite's markers.
benchmarks/offline_throughput.py appends its lines at the end of the file, so the offline section stays
last and new sections go above it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from benchmarks.bench.runner import SuiteRun

OFFLINE_HEADING = "## Offline throughput"


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _results_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | load | server | ok/failed | req/s | out tok/s | total tok/s | goodput req/s "
        "| TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50 ms | E2EL p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda r: (r["workload"]["name"], _load_key(r), r["label"]))
    for r in order:
        lines.append(
            f"| {r['workload']['name']} | {r['load_point']} | {r['label']} | {r['completed']}/{r['failed']} "
            f"| {_f(r['request_throughput'], 2)} | {_f(r['output_throughput'])} | {_f(r['total_token_throughput'])} "
            f"| {_f(r['request_goodput'], 2)} "
            f"| {_f(r['median_ttft_ms'], 0)} / {_f(r.get('p90_ttft_ms'), 0)} / {_f(r.get('p99_ttft_ms'), 0)} "
            f"| {_f(r['median_tpot_ms'])} / {_f(r.get('p90_tpot_ms'))} / {_f(r.get('p99_tpot_ms'))} "
            f"| {_f(r['median_itl_ms'])} | {_f(r['median_e2el_ms'], 0)} |"
        )
    return lines


def _load_key(r: dict[str, Any]) -> tuple[float, float]:
    rate = r["request_rate"]
    return (float("inf") if rate == "inf" else float(rate), float(r["max_concurrency"] or 0))


RATIO_COLUMNS = (
    ("output_throughput", "out tok/s"),
    ("request_throughput", "req/s"),
    ("median_ttft_ms", "TTFT p50"),
    ("p99_ttft_ms", "TTFT p99"),
    ("median_tpot_ms", "TPOT p50"),
    ("p99_tpot_ms", "TPOT p99"),
    ("median_itl_ms", "ITL p50"),
    ("median_e2el_ms", "E2EL p50"),
)


def _ratio_table(rows: dict[str, dict[str, float]]) -> list[str]:
    head = "| workload load | " + " | ".join(name for _, name in RATIO_COLUMNS) + " |"
    lines = [head, "|---" * (len(RATIO_COLUMNS) + 1) + "|"]
    for key, row in rows.items():
        cells = " | ".join(f"{row[m]:.2f}x" if m in row else "-" for m, _ in RATIO_COLUMNS)
        lines.append(f"| {key} | {cells} |")
    return lines


def summary_markdown(
    run: SuiteRun, ratio_tables: dict[str, dict[str, dict[str, float]]], checks: list[dict[str, Any]],
    figures: list[Path], figure_prefix: str = "",
) -> str:  # fmt: skip
    suite = run.suite
    first = run.results[0] if run.results else {}
    machine = first.get("machine", {})
    lines = [f"### Suite `{suite.suite}` (profile `{suite.profile}`), run {Path(run.out_dir).name}", ""]
    lines += [
        f"- commit `{first.get('commit', '?')}`; machine: {machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} "
        f"logical CPUs, GPU: {machine.get('gpu') or 'none'}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in machine.get('load_average_at_start', []))}",
        f"- model `{first.get('tokenizer_id', suite.model or '?')}`, API `{suite.api}`, ignore_eos {suite.ignore_eos}, "
        f"temperature {suite.temperature}; goodput SLOs (ms): {suite.goodput or 'none'}",
    ]
    if first.get("note"):
        lines.append(f"- note: {first['note']}")
    lines += [f"- {n}" for n in run.notes]
    servers = {r["label"]: r for r in run.results}
    for label, r in servers.items():
        argv = " ".join(str(a) for a in r["server_argv"] or []) or "(external)"
        env = " ".join(f"{k}={v}" for k, v in (r.get("server_env") or {}).items())
        lines.append(
            f"- server `{label}` ({r['engine_backend']}), ready in {r['server_startup_s']:.0f} s: `{(env + ' ' + argv).strip()}`"
        )
    for label, error in run.server_errors.items():
        lines.append(f"- server `{label}` FAILED: {error.splitlines()[0][:300]}")
    lines += ["", "#### Results", "", *_results_table(run.results)]
    errors = [
        (r["label"], r["workload"]["name"], r["load_point"], r["error_counts"])
        for r in run.results
        if r["error_counts"]
    ]
    if errors:
        lines += ["", "#### Errors", ""] + [f"- {a} {w} {p}: {e}" for a, w, p, e in errors]
    for baseline, rows in ratio_tables.items():
        lines += ["", f"#### Ours / {baseline} (throughput: higher is better; latency: lower is better)", ""]
        lines += _ratio_table(rows)
    if checks:
        lines += ["", "#### Targets", ""]
        for c in checks:
            verdict = "not run" if c["met"] is None else ("met" if c["met"] else "NOT met")
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
            lines.append(f"- {c['target']} vs {c['baseline']}: {ratio}, {verdict}")
    if figures:
        lines += ["", "#### Figures", ""] + [f"![{p.stem}]({figure_prefix}{p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def update_results_md(md_path: Path, suite_name: str, section: str, figures: list[Path]) -> None:
    """Replace (or add) this suite's section of RESULTS.md; copy its figures to figures/<suite>/ beside it."""
    fig_dir = md_path.parent / "figures" / suite_name
    if fig_dir.exists():
        for old in fig_dir.glob("*.png"):
            old.unlink()
    fig_dir.mkdir(parents=True, exist_ok=True)
    for p in figures:
        shutil.copy(p, fig_dir / p.name)
    replace_section(md_path, f"serve-bench:{suite_name}", section)


def replace_section(md_path: Path, marker: str, section: str) -> None:
    """Put section between <!-- marker:start --> and <!-- marker:end -->, adding the markers (above the
    offline section, which must stay last) when the file has none."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    text = md_path.read_text() if md_path.exists() else f"# Benchmark results\n\n{OFFLINE_HEADING}\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1 :]
    elif OFFLINE_HEADING in text:
        at = text.index(OFFLINE_HEADING)
        text = text[:at] + block + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    md_path.write_text(text)
