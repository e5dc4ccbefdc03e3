"""Benchmark suites (benchmarks/suites/<accelerator>.yaml): a profile, a model, the vLLM baseline's flags,
and workloads, each a dataset swept over concurrency levels or request rates.

    suite: cpu
    profile: cpu                    # configs/cpu.yaml: how glm-serve serves the model
    model: null                     # a model directory; null: the profile's (the embedded SmolLM2);
                                    # tiny-llama: a 2-layer random llama (benchmarks/bench/tiny_model.py)
    api: completions                # completions | chat
    ignore_eos: true                # outputs exactly max_tokens long on both servers
    goodput: {ttft: 2000, tpot: 200}  # SLOs (ms) for request_goodput
    glm_serve: {args: [...]}        # extra `glm-serve serve` flags (e.g. --set engine.max_num_seqs=128)
    vllm: {args: [...], env: {...}} # the vLLM OpenAI server's flags and environment for --baseline vllm
    workloads:
      - name: random-256-128
        dataset: random             # random | sharegpt | shared_prefix
        input_len: 256
        output_len: 128
        concurrency: [1, 4, 16, 64] # one run per level ...
        request_rate: [2, 4]        # ... and/or one per rate (Poisson, or gamma with burstiness)
        num_prompts: 64             # per run; or prompts_per_concurrency: N (N x level, within min_prompts..max_prompts)
    quick: {workloads: [...], concurrency: [4], num_prompts: 8}   # --quick: the CI subset

Unknown keys are errors naming the key, as in configs/."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench.metrics import SLO_KEYS

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DATASETS = ("random", "sharegpt", "shared_prefix")


class SuiteError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    dataset: str = "random"
    input_len: int = 256  # random: mean prompt tokens
    output_len: int = 128  # random/shared_prefix: max_tokens; sharegpt: replaces the reply's length if set
    range_ratio: float = 0.0  # random: lengths uniform in len*(1-r)..len*(1+r)
    prefix_len: int = 0  # shared_prefix: tokens of each shared system prompt
    suffix_len: int = 32  # shared_prefix: tokens of each request's own question
    num_prefixes: int = 1  # shared_prefix: how many distinct system prompts
    path: str | None = None  # sharegpt: the JSON file
    api: str | None = None  # completions | chat; None: the suite's
    concurrency: tuple[int, ...] = ()
    request_rate: tuple[float, ...] = ()
    burstiness: float = 1.0
    rate_max_concurrency: int | None = None  # a cap on the request-rate runs
    num_prompts: int | None = None
    prompts_per_concurrency: int | None = None
    min_prompts: int = 8
    max_prompts: int | None = None
    num_warmups: int = 2  # short requests sent (at the run's concurrency) before each load point
    seed: int = 0

    def prompts_for(self, concurrency: int | None) -> int:
        if self.prompts_per_concurrency and concurrency:
            n = max(self.min_prompts, self.prompts_per_concurrency * concurrency)
            return min(n, self.max_prompts) if self.max_prompts else n
        return self.num_prompts or self.min_prompts


@dataclass(frozen=True, slots=True)
class Target:
    """A goal on ours/baseline at one load point: ratio >= at_least (throughputs) or <= at_most (latencies)."""

    workload: str
    load: str  # a LoadPoint label: c16, r4, c64-r2 ...
    metric: str  # a result field, e.g. output_throughput, median_ttft_ms
    at_least: float | None = None
    at_most: float | None = None

    def met(self, ratio: float) -> bool:
        return (self.at_least is None or ratio >= self.at_least) and (
            self.at_most is None or ratio <= self.at_most
        )

    def describe(self) -> str:
        bound = f">= {self.at_least:g}" if self.at_least is not None else f"<= {self.at_most:g}"
        return f"{self.metric} at {self.workload} {self.load}: ours/baseline {bound}"


@dataclass(frozen=True, slots=True)
class Quick:
    workloads: tuple[str, ...] = ()
    concurrency: tuple[int, ...] = ()
    request_rate: tuple[float, ...] = ()
    num_prompts: int = 8
    output_len: int | None = None


@dataclass(frozen=True, slots=True)
class Suite:
    suite: str
    profile: str
    description: str = ""
    model: str | None = None
    tokenizer: str | None = None
    api: str = "completions"
    ignore_eos: bool = True
    temperature: float | None = 0.0
    goodput: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    glm_serve: dict[str, Any] = field(default_factory=dict)  # {args: [...]}
    vllm: dict[str, Any] = field(default_factory=dict)  # {args: [...], env: {...}}
    workloads: tuple[Workload, ...] = ()
    quick: Quick | None = None
    hardware: str | None = None  # what the suite needs, for suites this machine cannot run
    ready_timeout_s: float = 900.0  # how long a server may take to load the model and answer /health
    targets: tuple[Target, ...] = ()

    def quick_subset(self) -> Suite:
        """The --quick suite: the named workloads at the quick levels, with few prompts each."""
        if self.quick is None:
            raise SuiteError(f"suite {self.suite} has no quick subset")
        q = self.quick
        chosen = [w for w in self.workloads if w.name in q.workloads]
        small = [
            replace(
                w,
                concurrency=q.concurrency if w.concurrency else (),
                request_rate=q.request_rate if w.request_rate else (),
                num_prompts=q.num_prompts,
                prompts_per_concurrency=None,
                output_len=q.output_len or w.output_len,
                num_warmups=min(w.num_warmups, 1),
            )
            for w in chosen
        ]
        return replace(self, workloads=tuple(small))


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise SuiteError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")


def _workload(data: dict[str, Any], where: str) -> Workload:
    if not isinstance(data, dict) or "name" not in data:
        raise SuiteError(f"{where}: a workload is a mapping with a name")
    where = f"{where} workload {data['name']}"
    _check_keys(data, Workload, where)
    values = dict(data)
    for key in ("concurrency", "request_rate"):
        raw = values.get(key, ())
        values[key] = tuple(raw if isinstance(raw, list | tuple) else [raw])
    values["request_rate"] = tuple(math.inf if r == "inf" else float(r) for r in values["request_rate"])
    w = Workload(**values)
    if w.dataset not in DATASETS:
        raise SuiteError(f"{where}: dataset must be one of {', '.join(DATASETS)}, got {w.dataset!r}")
    if w.dataset == "sharegpt" and not w.path:
        raise SuiteError(f"{where}: the sharegpt dataset needs a path")
    if w.dataset == "shared_prefix" and w.prefix_len <= 0:
        raise SuiteError(f"{where}: shared_prefix needs prefix_len > 0")
    if not w.concurrency and not w.request_rate:
        raise SuiteError(f"{where}: give concurrency levels, request rates, or both")
    if any(c < 1 for c in w.concurrency) or any(r <= 0 for r in w.request_rate):
        raise SuiteError(f"{where}: concurrency levels and rates must be positive")
    if w.input_len < 1 or w.output_len < 1 or not 0 <= w.range_ratio < 1 or w.burstiness <= 0:
        raise SuiteError(f"{where}: lengths must be positive, range_ratio in [0, 1), burstiness > 0")
    if w.api not in (None, "completions", "chat"):
        raise SuiteError(f"{where}: api must be completions or chat")
    return w


def parse_suite(data: dict[str, Any], where: str = "suite") -> Suite:
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: a suite is a mapping")
    _check_keys(data, Suite, where)
    for key in ("suite", "profile"):
        if not data.get(key):
            raise SuiteError(f"{where}: '{key}' is required")
    if not (CONFIGS_DIR / f"{data['profile']}.yaml").exists():
        raise SuiteError(f"{where}: profile {data['profile']!r} is not in configs/")
    values = dict(data)
    values["workloads"] = tuple(_workload(w, where) for w in data.get("workloads") or [])
    if not values["workloads"]:
        raise SuiteError(f"{where}: no workloads")
    names = [w.name for w in values["workloads"]]
    if len(set(names)) != len(names):
        raise SuiteError(f"{where}: workload names repeat")
    if "percentiles" in values:
        values["percentiles"] = tuple(float(p) for p in values["percentiles"])
    goodput = values.get("goodput") or {}
    if any(k not in SLO_KEYS for k in goodput):
        raise SuiteError(f"{where}: goodput keys are {', '.join(SLO_KEYS)}")
    if values.get("api", "completions") not in ("completions", "chat"):
        raise SuiteError(f"{where}: api must be completions or chat")
    vllm = values.get("vllm") or {}
    if set(vllm) - {"args", "env"}:
        raise SuiteError(f"{where}: vllm takes args and env")
    if set(values.get("glm_serve") or {}) - {"args"}:
        raise SuiteError(f"{where}: glm_serve takes args")
    targets = []
    for t in values.get("targets") or []:
        _check_keys(t, Target, f"{where} target")
        target = Target(**t)
        if target.workload not in names or (target.at_least is None) == (target.at_most is None):
            raise SuiteError(f"{where}: target {t} needs a known workload and one of at_least / at_most")
        targets.append(target)
    values["targets"] = tuple(targets)
    if "quick" in values and values["quick"] is not None:
        _check_keys(values["quick"], Quick, f"{where} quick")
        q = dict(values["quick"])
        for key in ("workloads", "concurrency", "request_rate"):
            q[key] = tuple(q.get(key, ()))
        unknown = set(q["workloads"]) - set(names)
        if unknown or not q["workloads"]:
            raise SuiteError(f"{where} quick: workloads must name the suite's workloads ({sorted(unknown)})")
        values["quick"] = Quick(**q)
    return Suite(**values)


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    named = SUITES_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
    raise SuiteError(f"no suite {name_or_path!r} (known: {known})")


def load_suite(name_or_path: str) -> Suite:
    path = suite_path(name_or_path)
    return parse_suite(yaml.safe_load(path.read_text()), path.name)


def all_suites() -> list[Path]:
    return sorted(SUITES_DIR.glob("*.yaml"))
