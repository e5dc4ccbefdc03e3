"""`glm-serve routing report [--since 24h] [--model M] [--format table|json]`: per target pair, the shadow
comparisons (agreement rates, latency percentiles and ratios, errors), the canary's share, what the same
tokens cost at the price table, and the rollback events.

`glm-serve routing set MODEL --weight N`: change a weight on a running server (POST /admin/routing with
the admin key from $GLM_SERVE_ADMIN_KEY, or --api-key-env)."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from server.config import CONFIG_DIR, ConfigError, load_config
from server.routing import p95
from server.routing_store import ROUTING_TABLES_SINCE
from server.usage import UsageConfig, parse_usage_config
from server.usage_report import _iso, parse_since
from server.usage_schema import SchemaTooNew, check_not_newer

PAIR = ("model", "primary_target", "candidate_target")


def _p50(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def _rate(flags: list[Any]) -> float | None:
    seen = [bool(f) for f in flags if f is not None]
    return round(sum(seen) / len(seen), 4) if seen else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _latency(rows: list[dict], side: str, column: str) -> dict[str, float | None]:
    values = [
        r[f"{side}_{column}"]
        for r in rows
        if r[f"{side}_{column}"] is not None and r[f"{side}_status"] == 200
    ]
    return {"p50": _p50(values), "p95": p95(values)}


def _cost(rows: list[dict], side: str, cfg: UsageConfig) -> dict[str, float | None]:
    """The side's tokens at the official and HolySheep prices of the model (None: no price)."""
    out: dict[str, float | None] = {}
    for backend in ("official", "holysheep"):
        total, priced = 0.0, False
        for row in rows:
            price = cfg.price(backend, row["model"])
            if price is not None and row[f"{side}_tokens"] is not None:
                total += price.cost(int(row["prompt_tokens"] or 0), int(row[f"{side}_tokens"]))
                priced = True
        out[backend] = round(total, 6) if priced else None
    return out


def _shadow_figures(rows: list[dict], cfg: UsageConfig) -> dict[str, Any]:
    errors = sum(r["candidate_error"] is not None or (r["candidate_status"] or 0) >= 400 for r in rows)
    ttft = {s: _latency(rows, s, "ttft_s") for s in ("primary", "candidate")}
    latency = {s: _latency(rows, s, "latency_s") for s in ("primary", "candidate")}
    similarity = [r["similarity"] for r in rows if r["similarity"] is not None]
    return {
        "requests": len(rows),
        "candidate_errors": errors,
        "candidate_error_rate": round(errors / len(rows), 4),
        "tool_call_agreement": _rate([r["tool_call_agreement"] for r in rows]),
        "json_valid": {s: _rate([r[f"{s}_json_valid"] for r in rows]) for s in ("primary", "candidate")},
        "finish_reason_agreement": _rate(
            [
                r["primary_finish"] == r["candidate_finish"] if r["similarity"] is not None else None
                for r in rows
            ]
        ),
        "similarity_mean": round(sum(similarity) / len(similarity), 4) if similarity else None,
        "ttft_s": {**ttft, "p95_ratio": _ratio(ttft["candidate"]["p95"], ttft["primary"]["p95"])},
        "latency_s": {**latency, "p95_ratio": _ratio(latency["candidate"]["p95"], latency["primary"]["p95"])},
        "cost_usd": {s: _cost(rows, s, cfg) for s in ("primary", "candidate")},
    }


def _canary_figures(rows: list[dict], cfg: UsageConfig) -> dict[str, Any]:
    on_candidate = [r for r in rows if r["served"] == "candidate"]
    errors = sum(
        r["candidate_error"] is not None or (r["candidate_status"] or 0) >= 400 for r in on_candidate
    )
    return {
        "requests": len(rows),
        "candidate_requests": len(on_candidate),
        "candidate_share": round(len(on_candidate) / len(rows), 4),
        "candidate_errors": errors,
        "ttft_s": {s: _latency(rows, s, "ttft_s") for s in ("primary", "candidate")},
        "latency_s": {s: _latency(rows, s, "latency_s") for s in ("primary", "candidate")},
        "cost_usd": {s: _cost(rows, s, cfg) for s in ("primary", "candidate")},
    }


def build_report(db_path: Path, cfg: UsageConfig, since: str | None = None, model: str | None = None) -> dict:
    now = time.time()
    start = parse_since(since, now) or 0.0
    with closing(sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
        version = check_not_newer(db, db_path)
        if version < ROUTING_TABLES_SINCE:
            raise ValueError(f"{db_path} (schema version {version}) has no routing tables yet")
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM comparisons WHERE ts >= ? ORDER BY ts", (start,))]
        events = [dict(r) for r in db.execute("SELECT * FROM rollbacks WHERE ts >= ? ORDER BY ts", (start,))]
    if model is not None:
        rows = [r for r in rows if r["model"] == model]
        events = [e for e in events if e["model"] == model]
    pairs: dict[tuple, dict[str, list]] = {}
    for row in rows:
        pairs.setdefault(tuple(row[c] for c in PAIR), {"shadow": [], "canary": []})[row["kind"]].append(row)
    out = []
    for (pair_model, primary, candidate), kinds in sorted(pairs.items()):
        out.append({
            "model": pair_model, "primary": primary, "candidate": candidate,
            "shadow": _shadow_figures(kinds["shadow"], cfg) if kinds["shadow"] else None,
            "canary": _canary_figures(kinds["canary"], cfg) if kinds["canary"] else None,
        })  # fmt: skip
    for event in events:
        event["time"] = _iso(event.pop("ts"))
        event.pop("id")
    return {"since": _iso(start) if since else None, "until": _iso(now), "pairs": out, "rollbacks": events}


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    lines = []
    for pair in report["pairs"]:
        lines.append(f"{pair['model']}: {pair['primary']} -> {pair['candidate']}")
        if pair["shadow"]:
            s = pair["shadow"]
            lines.append(
                f"  shadow  {s['requests']} pairs, candidate errors {s['candidate_errors']} "
                f"({s['candidate_error_rate']:.1%}), tool-call agreement {_cell(s['tool_call_agreement'])}, "
                f"JSON valid {_cell(s['json_valid']['candidate'])}, similarity {_cell(s['similarity_mean'])}, "
                f"p95 TTFT x{_cell(s['ttft_s']['p95_ratio'])}, p95 latency x{_cell(s['latency_s']['p95_ratio'])}"
            )
            lines.append(f"          cost of the same tokens (official/holysheep): {_costs(s['cost_usd'])}")
        if pair["canary"]:
            c = pair["canary"]
            lines.append(
                f"  canary  {c['requests']} requests, candidate share {c['candidate_share']:.1%}, "
                f"candidate errors {c['candidate_errors']}"
            )
            lines.append(f"          cost of the same tokens (official/holysheep): {_costs(c['cost_usd'])}")
    for event in report["rollbacks"]:
        lines.append(
            f"rollback {event['time']} {event['model']} -> {event['target']}: {event['guard']} ({event['detail']}); "
            f"weight {event['weight_before']:g} -> 0"
        )
    period = f"since {report['since']}" if report["since"] else "all time"
    return "\n".join([*(lines or ["no routed requests"]), f"{period} to {report['until']}"])


def _costs(costs: dict[str, dict[str, float | None]]) -> str:
    return ", ".join(f"{side} {_cell(c['official'])}/{_cell(c['holysheep'])}" for side, c in costs.items())


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def set_weight(url: str, api_key: str, model: str, weight: float) -> dict[str, Any]:
    response = httpx.post(
        f"{url.rstrip('/')}/admin/routing",
        json={"model": model, "weight": weight},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    body = response.json()
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {body.get('error', {}).get('message', body)}")
    return body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-serve routing", description="shadow and canary routing")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="comparisons, canary share, costs and rollbacks per target pair"
    )
    report.add_argument("--since", help="a duration back from now (24h, 7d) or an ISO date; default: all")
    report.add_argument("--model", help="only this served model")
    report.add_argument("--format", choices=["table", "json"], default="table")
    report.add_argument("--config", default=str(CONFIG_DIR / "cpu.yaml"), help="profile (store path, prices)")
    report.add_argument("--db", help="the state database (default: the profile's usage.path)")
    setter = commands.add_parser("set", help="change a model's weight on a running server")
    setter.add_argument("model")
    setter.add_argument("--weight", type=float, required=True, help="0-100 (%%)")
    setter.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    setter.add_argument("--api-key-env", default="GLM_SERVE_ADMIN_KEY", help="variable holding an admin key")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "set":
            key = os.environ.get(args.api_key_env, "")
            if not key:
                raise ValueError(f"set {args.api_key_env} to an admin API key of the server")
            body = set_weight(args.url, key, args.model, args.weight)
            print(json.dumps(body["models"][args.model]))
            return 0
        config = load_config(args.config)
        usage_cfg = parse_usage_config(config.extra.get("usage"))
        db_path = Path(args.db) if args.db else usage_cfg.resolved_path()
        if not db_path.is_file():
            raise ValueError(f"no state database at {db_path}")
        print(render(build_report(db_path, usage_cfg, args.since, args.model), args.format))
    except (ConfigError, ValueError, SchemaTooNew, sqlite3.Error, httpx.HTTPError) as exc:
        print(f"glm-serve routing: {exc}", file=sys.stderr)
        return 2
    return 0
