"""`glm-serve usage report [--since 7d] [--by model|key|backend] [--format table|json|csv]` and the JSON
that GET /v1/usage returns: totals, the overflow share, and what the same tokens cost (or would have
cost) locally, on the overflow upstream and on the official APIs.

Every figure is a SUM over ledger rows (server/usage.py explains each row's cost columns), so the totals
match the rows. In `cost_usd`: local and overflow are what was spent, actual their sum; if_official and
if_holysheep price every token of the period at the official API's / HolySheep's price of its model
(tokens of models without such a price are counted in `unpriced_tokens`; null when none is priced);
if_local extrapolates the period's local $ per token (GPU-hours x usage.gpu_hour_usd) to every token."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from server.config import CONFIG_DIR, ConfigError, load_config
from server.usage import UsageConfig, parse_usage_config
from server.usage_schema import SchemaTooNew, check_not_newer

GROUP_COLUMNS = {"model": "model", "key": "key_id", "backend": "backend"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SINCE_S = 100 * 366 * 86400  # how far back --since may reach (further is an input error, not a 500)
_AGGREGATES = """
    COUNT(*) AS requests,
    COALESCE(SUM(backend = 'holysheep'), 0) AS overflow_requests,
    COALESCE(SUM(backend NOT IN ('local', 'holysheep')), 0) AS routed_requests,
    COALESCE(SUM(status >= 400), 0) AS failed_requests,
    COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,
    COALESCE(SUM(completion_tokens), 0) AS completion_tokens,
    COALESCE(SUM(CASE WHEN backend = 'holysheep' THEN prompt_tokens + completion_tokens END), 0)
        AS overflow_tokens,
    COALESCE(SUM(CASE WHEN backend NOT IN ('local', 'holysheep') THEN prompt_tokens + completion_tokens END), 0)
        AS routed_tokens,
    COALESCE(SUM(NOT tokens_exact), 0) AS estimated_rows,
    COALESCE(SUM(gpu_seconds), 0) AS gpu_seconds,
    SUM(CASE WHEN backend = 'local' THEN cost_usd END) AS local_usd,
    COALESCE(SUM(CASE WHEN backend = 'holysheep' THEN cost_usd END), 0) AS overflow_usd,
    SUM(official_usd) AS official_usd,
    COALESCE(SUM(CASE WHEN official_usd IS NULL THEN prompt_tokens + completion_tokens END), 0)
        AS official_unpriced,
    SUM(holysheep_usd) AS holysheep_usd,
    COALESCE(SUM(CASE WHEN holysheep_usd IS NULL THEN prompt_tokens + completion_tokens END), 0)
        AS holysheep_unpriced
"""


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'7d', '12h', '30m', '90s', '2w', or an ISO date/time (UTC unless it says otherwise) -> unix time."""
    if not text:
        return None
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds > MAX_SINCE_S:
            raise ValueError(f"--since {text!r}: at most {MAX_SINCE_S // _UNITS['d']:.0f}d back")
        return now - seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: use a duration like 7d, 12h, 30m, or an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if not now - MAX_SINCE_S <= when.timestamp() <= now + _UNITS["d"]:
        raise ValueError(
            f"--since {text!r}: give a date within the last {MAX_SINCE_S // _UNITS['d']:.0f} days"
        )
    return when.timestamp()


def _figures(agg: dict[str, Any]) -> dict[str, Any]:
    requests, total = agg["requests"], agg["prompt_tokens"] + agg["completion_tokens"]
    local_tokens = total - agg["overflow_tokens"] - agg["routed_tokens"]
    local_usd = agg["local_usd"]
    if_local = local_usd / local_tokens * total if local_usd is not None and local_tokens > 0 else None
    actual = (local_usd or 0.0) + agg["overflow_usd"]
    return {
        "requests": requests,
        "local_requests": requests - agg["overflow_requests"] - agg["routed_requests"],
        "overflow_requests": agg["overflow_requests"],
        "routed_requests": agg["routed_requests"],  # served by a routing target upstream (canary or primary)
        "routed_share": _ratio(agg["routed_requests"], requests),
        "failed_requests": agg["failed_requests"],
        "overflow_share": _ratio(agg["overflow_requests"], requests),
        "prompt_tokens": agg["prompt_tokens"],
        "completion_tokens": agg["completion_tokens"],
        "total_tokens": total,
        "overflow_tokens": agg["overflow_tokens"],
        "overflow_token_share": _ratio(agg["overflow_tokens"], total),
        "estimated_token_rows": agg["estimated_rows"],
        "local_gpu_hours": round(agg["gpu_seconds"] / 3600, 9),
        "cost_usd": {
            "local": _usd(local_usd),
            "overflow": _usd(agg["overflow_usd"]),
            "actual": _usd(actual),
            "if_official": _usd(agg["official_usd"]),
            "if_holysheep": _usd(agg["holysheep_usd"]),
            "if_local": _usd(if_local),
        },
        "unpriced_tokens": {"official": agg["official_unpriced"], "holysheep": agg["holysheep_unpriced"]},
    }


def _ratio(part: float, whole: float) -> float:
    return round(part / whole, 6) if whole else 0.0


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def build_report(db_path: Path, cfg: UsageConfig, since: str | None = None, by: str | None = "model") -> dict:
    """The report as a JSON-ready dict (GET /v1/usage returns exactly this)."""
    if by is not None and by not in GROUP_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(GROUP_COLUMNS)}, not {by!r}")
    now = time.time()
    start = parse_since(since, now)
    where, params = ("WHERE ts >= ?", (start,)) if start is not None else ("", ())
    groups: list[dict[str, Any]] = []
    with closing(sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
        check_not_newer(db, db_path)
        db.row_factory = sqlite3.Row
        totals = dict(db.execute(f"SELECT {_AGGREGATES} FROM usage {where}", params).fetchone())
        if by is not None:
            column = GROUP_COLUMNS[by]
            sql = f"SELECT {column} AS grp, {_AGGREGATES} FROM usage {where} GROUP BY {column} ORDER BY {column}"
            for row in db.execute(sql, params):
                groups.append({by: row["grp"], **_figures(dict(row))})
    return {
        "since": _iso(start),
        "until": _iso(now),
        "by": by,
        "prices_as_of": cfg.prices_as_of,
        "gpu_hour_usd": cfg.gpu_hour_usd,
        "totals": _figures(totals),
        "groups": groups,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# -- output -----------------------------------------------------------------------------------------------
COLUMNS = ["requests", "overflow_share", "prompt_tokens", "completion_tokens", "local_gpu_hours",
           "local_usd", "overflow_usd", "actual_usd", "if_official_usd", "if_holysheep_usd", "if_local_usd"]  # fmt: skip


def _flat(name: str, figures: dict[str, Any]) -> list[Any]:
    costs = figures["cost_usd"]
    return [name, *(figures[c] for c in COLUMNS[:5]), costs["local"], costs["overflow"], costs["actual"],
            costs["if_official"], costs["if_holysheep"], costs["if_local"]]  # fmt: skip


def _rows(report: dict[str, Any]) -> list[list[Any]]:
    by = report["by"]
    return [*(_flat(str(g[by]), g) for g in report["groups"]), _flat("TOTAL", report["totals"])]


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    header = [report["by"] or "group", *COLUMNS]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in _rows(report))
        return out.getvalue().rstrip("\n")
    cells = [header, *([_cell(v) for v in row] for row in _rows(report))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    period = f"since {report['since']}" if report["since"] else "all time"
    note = f"{period} to {report['until']}; prices as of {report['prices_as_of']}"
    if report["gpu_hour_usd"] is None:
        note += "; local $ n/a: set usage.gpu_hour_usd"
    return "\n".join([*lines, note])


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-serve usage", description="the usage ledger")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="totals, overflow share and cost comparison")
    report.add_argument(
        "--since", help="a duration back from now (7d, 12h, 30m) or an ISO date; default: all"
    )
    report.add_argument("--by", choices=sorted(GROUP_COLUMNS), default="model", help="group rows by")
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument(
        "--config", default=str(CONFIG_DIR / "cpu.yaml"), help="profile (ledger path, prices)"
    )
    report.add_argument("--db", help="ledger file (default: the profile's usage.path)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = parse_usage_config(load_config(args.config).extra.get("usage"))
        db_path = Path(args.db) if args.db else cfg.resolved_path()
        if not db_path.is_file():
            raise ValueError(f"no usage ledger at {db_path}")
        print(render(build_report(db_path, cfg, args.since, args.by), args.format))
    except (ConfigError, ValueError, SchemaTooNew, sqlite3.Error) as exc:
        print(f"glm-serve usage: {exc}", file=sys.stderr)
        return 2
    return 0
