"""Run a suite: for each server in turn (ours first, then each baseline), start it, run every workload at
every load point on the same requests, stop it; then write the results, the ours/baseline ratios, plots
and summary.md under <out>/<suite>/<timestamp>/.

Servers run one after another, never side by side: on a shared host they would take each other's cores."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench.client import Endpoint
from benchmarks.bench.datasets import (
    HFTokenizer,
    SampleRequest,
    random_dataset,
    shared_prefix_dataset,
    sharegpt_dataset,
)
from benchmarks.bench.loadgen import LoadPoint, make_client, run_load_point
from benchmarks.bench.servers import ManagedServer, ServerError, ServerSpec, git_commit, machine_info
from benchmarks.bench.suite import Suite, Workload

WARMUP_OUTPUT_LEN = 16
HIGHER_IS_BETTER = ("output_throughput", "request_throughput", "total_token_throughput", "request_goodput")
LOWER_IS_BETTER = (
    "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
    "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms",
)  # fmt: skip


@dataclass(slots=True)
class RunPlan:
    workload: Workload
    point: LoadPoint
    api: str
    requests: list[SampleRequest]
    warmups: list[SampleRequest]


@dataclass(slots=True)
class SuiteRun:
    suite: Suite
    out_dir: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    server_errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reference: str = "glm-serve"  # the server the ratios divide by the others: ours, or the first URL

    def by_label(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.results:
            out.setdefault(r["label"], []).append(r)
        return out


def build_requests(
    w: Workload, tok: HFTokenizer, n: int, seed: int, output_len: int | None = None
) -> list[SampleRequest]:
    out_len = output_len or w.output_len
    if w.dataset == "random":
        return random_dataset(tok, n, w.input_len, out_len, w.range_ratio, seed)
    if w.dataset == "shared_prefix":
        return shared_prefix_dataset(tok, n, w.prefix_len, w.suffix_len, out_len, w.num_prefixes, seed)
    return sharegpt_dataset(tok, w.path or "", n, output_len, seed)


def load_points(w: Workload) -> list[LoadPoint]:
    points = [LoadPoint(max_concurrency=c, num_warmups=w.num_warmups, seed=w.seed) for c in w.concurrency]
    points += [
        LoadPoint(w.rate_max_concurrency, rate, w.burstiness, w.num_warmups, w.seed)
        for rate in w.request_rate
    ]
    return points


def plan_runs(suite: Suite, tok: HFTokenizer) -> list[RunPlan]:
    """Each load point gets its own prompts (seeded by workload and load point), so no point finds another's
    prompts in the prefix cache; the warm-up prompts are different again, and short."""
    plans = []
    for w in suite.workloads:
        for point in load_points(w):
            n = w.prompts_for(point.max_concurrency if math.isinf(point.request_rate) else None)
            seed = w.seed + zlib.crc32(f"{w.name}/{point.label()}".encode())
            requests = build_requests(w, tok, n, seed)
            warmups = (
                build_requests(w, tok, point.num_warmups, seed + 1, WARMUP_OUTPUT_LEN)
                if point.num_warmups
                else []
            )
            plans.append(RunPlan(w, point, w.api or suite.api, requests, warmups))
    return plans


def _workload_record(w: Workload) -> dict[str, Any]:
    record = {k: v for k, v in asdict(w).items() if v not in (None, (), [])}
    record["request_rate"] = ["inf" if math.isinf(r) else r for r in w.request_rate]
    return record


def _run_server(
    run: SuiteRun, spec: ServerSpec, plans: list[RunPlan], tok: HFTokenizer, meta: dict[str, Any]
) -> None:
    log_path = run.out_dir / f"server-{_slug(spec.label)}.log"
    print(f"[{spec.label}] starting ...", flush=True)
    with ManagedServer(spec, log_path, run.suite.ready_timeout_s) as server:
        print(f"[{spec.label}] ready in {server.startup_s:.1f} s, model {server.model_id}", flush=True)
        for plan in plans:
            endpoint = Endpoint(
                spec.base_url,
                server.model_id or "",
                plan.api,
                spec.api_key,
                run.suite.ignore_eos,
                run.suite.temperature,
            )
            t0 = time.perf_counter()
            result = asyncio.run(_run_plan(endpoint, plan, tok, run.suite, meta.get("detailed", False)))
            result.update(
                label=spec.label,
                engine_backend=spec.engine_backend,
                tokenizer_id=tok.name,
                suite=run.suite.suite,
                profile=run.suite.profile,
                workload=_workload_record(plan.workload),
                load_point=plan.point.label(),
                server_startup_s=server.startup_s,
                server_argv=spec.argv,
                server_env=spec.env,
                commit=meta["commit"],
                machine=meta["machine"],
                note=meta.get("note"),
                load_average=list(os.getloadavg()),  # host load after the run: how shared the machine was
            )
            run.results.append(result)
            name = f"{_slug(spec.label)}__{plan.workload.name}__{plan.point.label()}.json"
            (run.out_dir / name).write_text(json.dumps(result, indent=2))
            print(
                f"[{spec.label}] {plan.workload.name} {plan.point.label()}: {result['completed']}/{result['num_prompts']} ok, "
                f"{result['output_throughput']:.1f} out tok/s, TTFT p50 {result['median_ttft_ms']:.0f} ms, "
                f"TPOT p50 {result['median_tpot_ms']:.1f} ms ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


async def _run_plan(
    endpoint: Endpoint, plan: RunPlan, tok: HFTokenizer, suite: Suite, detailed: bool
) -> dict[str, Any]:
    async with make_client() as client:
        return await run_load_point(
            endpoint,
            plan.requests,
            plan.point,
            warmup_requests=plan.warmups,
            count_tokens=lambda text: len(tok.encode(text)),
            percentiles=suite.percentiles,
            goodput=suite.goodput or None,
            detailed=detailed,
            client=client,
        )


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:60]


def run_suite(
    suite: Suite,
    servers: list[ServerSpec],
    out_root: Path,
    tokenizer_dir: str | Path,
    *,
    detailed: bool = False,
    note: str | None = None,
    notes: list[str] | None = None,
    baseline_first: bool = False,
) -> SuiteRun:
    out_dir = out_root / suite.suite / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = SuiteRun(suite, out_dir, notes=list(notes or []), reference=servers[0].label)
    if baseline_first and len(servers) > 1:
        servers = [*servers[1:], servers[0]]
        run.notes.append(f"order: baselines first, {run.reference} last")
    tok = HFTokenizer(tokenizer_dir)
    plans = plan_runs(suite, tok)
    meta = {
        "commit": git_commit(),
        "machine": machine_info(),
        "note": note,
        "detailed": detailed,
    }
    for spec in servers:
        try:
            _run_server(run, spec, plans, tok, meta)
        except (ServerError, OSError) as exc:
            run.server_errors[spec.label] = str(exc)
            print(f"[{spec.label}] FAILED: {str(exc)[:2000]}", flush=True)
    return run


def load_run(suite: Suite, out_dir: Path) -> SuiteRun:
    """A finished run read back from its results.json (to re-render it)."""
    record = json.loads((out_dir / "results.json").read_text())
    run = SuiteRun(
        suite, out_dir, record["results"], record.get("server_errors", {}), record.get("notes", [])
    )
    run.reference = record.get("reference") or (run.results[0]["label"] if run.results else "glm-serve")
    return run


def ratios(run: SuiteRun, ours: str = "glm-serve") -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {"workload load": {metric: ours/baseline}}} for every load point both servers ran."""
    labels = run.by_label()
    mine = {(r["workload"]["name"], r["load_point"]): r for r in labels.get(ours, [])}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, results in labels.items():
        if label == ours:
            continue
        table = out.setdefault(label, {})
        for theirs in results:
            key = (theirs["workload"]["name"], theirs["load_point"])
            if key not in mine:
                continue
            row = {}
            for metric in HIGHER_IS_BETTER + LOWER_IS_BETTER:
                a, b = mine[key].get(metric), theirs.get(metric)
                if isinstance(a, int | float) and isinstance(b, int | float) and b:
                    row[metric] = a / b
            table[f"{key[0]} {key[1]}"] = row
    return out


def check_targets(run: SuiteRun, table: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    checks = []
    for baseline, rows in table.items():
        for target in run.suite.targets:
            ratio = rows.get(f"{target.workload} {target.load}", {}).get(target.metric)
            checks.append(
                {
                    "baseline": baseline,
                    "target": target.describe(),
                    "ratio": ratio,
                    "met": None if ratio is None else target.met(ratio),
                }
            )
    return checks
