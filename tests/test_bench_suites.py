"""Benchmark suites (benchmarks/suites/*.yaml): all load, name existing profiles, carry a comment on every
value as configs/ do, cover the shapes their hardware's users run, and bad suites are errors naming the key."""

from __future__ import annotations

import re

import pytest
import yaml

from benchmarks.bench.runner import load_points, plan_runs
from benchmarks.bench.suite import CONFIGS_DIR, SUITES_DIR, SuiteError, load_suite, parse_suite

HARDWARE = ["nvidia-h100", "nvidia-h200", "ascend-910b", "cambricon-mlu590"]
SUITES = ["cpu", "cpu-tiny", *HARDWARE]
KEY_VALUE = re.compile(r"^\s*(- )?[A-Za-z_][\w.-]*:\s*\S")


def test_the_suite_set():
    assert sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) == sorted(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_suite_loads_and_names_an_existing_profile(name):
    suite = load_suite(name)
    assert suite.suite == name and suite.description
    assert (CONFIGS_DIR / f"{suite.profile}.yaml").exists()
    assert suite.quick is not None and suite.quick_subset().workloads
    for w in suite.workloads:
        assert load_points(w)


@pytest.mark.parametrize("name", SUITES)
def test_every_value_carries_a_comment(name):
    for number, line in enumerate((SUITES_DIR / f"{name}.yaml").read_text().splitlines(), 1):
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if KEY_VALUE.match(line) or line.lstrip().startswith("- "):
            assert " #" in line, f"{name}.yaml:{number} has a value without a comment: {line.strip()}"


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_suites_run_the_glm5_shapes_from_1_to_128(name):
    suite = load_suite(name)
    assert suite.hardware and suite.model and suite.ready_timeout_s >= 1800
    shapes = {(w.input_len, w.output_len) for w in suite.workloads if w.dataset == "random" and w.concurrency}
    assert {(1024, 1024), (8192, 1024)} <= shapes
    for w in suite.workloads:
        if w.dataset == "random" and w.concurrency:
            assert min(w.concurrency) == 1 and max(w.concurrency) == 128
    assert any(w.request_rate for w in suite.workloads)
    assert "--tensor-parallel-size" in [str(a) for a in suite.vllm["args"]]


def test_cpu_suite_targets_and_quick_subset():
    suite = load_suite("cpu")
    assert suite.model is None and suite.profile == "cpu"
    targets = {(t.workload, t.load, t.metric) for t in suite.targets}
    assert targets == {
        ("random-256-32", "c16", "output_throughput"),
        ("random-256-32", "c64", "output_throughput"),
        ("random-256-32", "c16", "median_ttft_ms"),
    }
    sweep = next(w for w in suite.workloads if w.name == "random-256-32")
    assert sweep.concurrency == (1, 4, 16, 64)
    assert {w.dataset for w in suite.workloads} >= {"random", "shared_prefix"}
    assert any(w.request_rate for w in suite.workloads) and any(w.api == "chat" for w in suite.workloads)
    quick = suite.quick_subset()
    assert sum(len(load_points(w)) * w.num_prompts for w in quick.workloads) <= 24  # CI's two minutes
    assert all(w.output_len <= 16 for w in quick.workloads)


class WordTokenizer:
    vocab_size = 1000
    name = "words"

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def test_every_load_point_gets_its_own_prompts():
    """No load point may find another's prompts (or the warm-up's) in the prefix cache."""
    suite = load_suite("cpu")
    plans = plan_runs(suite, WordTokenizer())
    prompts = [r.prompt for plan in plans for r in plan.requests + plan.warmups if not r.system]
    assert len(prompts) == len(set(prompts))
    c64 = next(p for p in plans if p.point.label() == "c64")
    assert len(c64.requests) == 64 and len(c64.warmups) == 2
    assert all(r.expected_output_len <= 20 for r in c64.warmups)  # 16, +-25%
    c1 = next(p for p in plans if p.point.label() == "c1")
    assert len(c1.requests) == 4


def minimal(**extra):
    data = {"suite": "t", "profile": "cpu", "workloads": [{"name": "w", "concurrency": [1]}]}
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(profil="cpu"), "unknown key 'profil'"),
        (minimal(profile="tpu-v9"), "not in configs"),
        (
            minimal(workloads=[{"name": "w", "concurrency": [1], "input_length": 5}]),
            "unknown key 'input_length'",
        ),
        (minimal(workloads=[{"name": "w"}]), "concurrency levels, request rates"),
        (minimal(workloads=[{"name": "w", "dataset": "sharegpt", "concurrency": [1]}]), "needs a path"),
        (minimal(workloads=[{"name": "w", "dataset": "shared_prefix", "concurrency": [1]}]), "prefix_len"),
        (minimal(workloads=[{"name": "w", "dataset": "lmsys", "concurrency": [1]}]), "dataset must be"),
        (minimal(workloads=[{"name": "w", "concurrency": [0]}]), "positive"),
        (minimal(goodput={"latency": 5}), "goodput keys"),
        (minimal(quick={"workloads": ["nope"]}), "quick"),
        (minimal(targets=[{"workload": "w", "load": "c1", "metric": "output_throughput"}]), "at_least"),
        (minimal(workloads=[]), "no workloads"),
    ],
)
def test_bad_suites_are_errors_naming_the_problem(data, message):
    with pytest.raises(SuiteError, match=message):
        parse_suite(data)


def test_rates_parse_including_inf():
    suite = parse_suite(
        yaml.safe_load(
            "suite: t\nprofile: cpu\nworkloads: [{name: w, request_rate: [1, inf], burstiness: 0.5}]"
        )
    )
    assert [p.label() for p in load_points(suite.workloads[0])] == ["r1b0.5", "all"]
