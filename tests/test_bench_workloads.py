"""Serving-benchmark workloads: datasets are deterministic for a seed and have the asked-for shapes;
arrival gaps have the statistics of a Poisson or gamma process."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from benchmarks.bench.arrivals import arrival_offsets
from benchmarks.bench.datasets import (
    HFTokenizer,
    random_dataset,
    random_text,
    shared_prefix_dataset,
    sharegpt_dataset,
)
from tests.engine_helpers import smollm_dir


class WordTokenizer:
    """One token per space-separated word w0..w999: encode(decode(ids)) == ids."""

    vocab_size = 1000

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def smollm_tokenizer() -> HFTokenizer:
    return HFTokenizer(smollm_dir())


def test_random_dataset_is_deterministic_and_sized():
    tok = WordTokenizer()
    a = random_dataset(tok, 50, 100, 20, range_ratio=0.5, seed=7)
    assert a == random_dataset(tok, 50, 100, 20, range_ratio=0.5, seed=7)
    assert a != random_dataset(tok, 50, 100, 20, range_ratio=0.5, seed=8)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.expected_output_len <= 30 for r in a)
    assert all(len(tok.encode(r.prompt)) == r.prompt_len for r in a)
    assert len({r.prompt_len for r in a}) > 10  # the range is used
    fixed = random_dataset(tok, 5, 64, 8, seed=0)
    assert {(r.prompt_len, r.expected_output_len) for r in fixed} == {(64, 8)}


def test_random_text_hits_the_length_with_a_real_tokenizer(smollm_tokenizer):
    r = random.Random(0)
    for n in (1, 16, 256, 1000):
        text, count = random_text(r, smollm_tokenizer, n)
        assert abs(count - n) <= 2, (n, count)
        assert count == len(smollm_tokenizer.encode(text))
    a = random_dataset(smollm_tokenizer, 4, 128, 16, seed=3)
    assert a == random_dataset(smollm_tokenizer, 4, 128, 16, seed=3)


def test_shared_prefix_dataset_shares_its_system_prompts():
    tok = WordTokenizer()
    reqs = shared_prefix_dataset(tok, 40, prefix_len=200, suffix_len=10, output_len=5, num_prefixes=4, seed=1)
    assert reqs == shared_prefix_dataset(tok, 40, 200, 10, 5, 4, seed=1)
    systems = {r.system for r in reqs}
    assert len(systems) == 4 and all(len(tok.encode(s)) == 200 for s in systems)
    assert len({r.prompt for r in reqs}) == 40  # every question is its own
    assert all(r.prompt_len == 210 and r.expected_output_len == 5 for r in reqs)
    assert sorted(sum(r.system == s for r in reqs) for s in systems) == [10, 10, 10, 10]


def test_sharegpt_dataset_reads_filters_and_shuffles(tmp_path):
    tok = WordTokenizer()

    def words(n: int, start: int) -> str:
        return " ".join(f"w{start + i}" for i in range(n))

    entries = [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": words(5 + i, i)},
                {"from": "gpt", "value": words(8, 0)},
            ],
        }
        for i in range(20)
    ]
    entries.append(
        {
            "id": "short",
            "conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": words(9, 0)}],
        }
    )
    entries.append(
        {
            "id": "long",
            "conversations": [
                {"from": "human", "value": words(900, 0)},
                {"from": "gpt", "value": words(9, 0)},
            ],
        }
    )
    entries.append({"id": "no-reply", "conversations": [{"from": "human", "value": words(9, 0)}]})
    entries.append(
        {
            "id": "system-first",
            "conversations": [
                {"from": "system", "value": "w1"},
                {"from": "human", "value": words(6, 50)},
                {"from": "gpt", "value": words(4, 0)},
            ],
        }
    )
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    reqs = sharegpt_dataset(tok, path, 21, seed=0, max_prompt_len=100)
    assert reqs == sharegpt_dataset(tok, path, 21, seed=0, max_prompt_len=100)
    assert [r.prompt for r in reqs] != [
        r.prompt for r in sharegpt_dataset(tok, path, 21, seed=1, max_prompt_len=100)
    ]
    prompts = {r.prompt for r in reqs}
    assert "w1 w2" not in prompts and words(900, 0) not in prompts  # under 4 tokens; over max_prompt_len
    assert words(6, 50) in prompts  # the first human turn followed by a reply
    assert all(r.prompt_len == len(tok.encode(r.prompt)) and r.expected_output_len in (8, 4) for r in reqs)
    assert {r.expected_output_len for r in sharegpt_dataset(tok, path, 5, output_len=32)} == {32}
    with pytest.raises(ValueError, match="usable"):
        sharegpt_dataset(tok, path, 30)


# --- arrivals ------------------------------------------------------------------------------------------


def gaps(rate: float, burstiness: float, n: int = 20000, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_offsets(n, rate, burstiness, seed), prepend=0.0)


def test_offsets_are_deterministic_sorted_and_span_n_over_rate():
    a = arrival_offsets(500, 4.0, 1.0, seed=3)
    assert a == arrival_offsets(500, 4.0, 1.0, seed=3) and a != arrival_offsets(500, 4.0, 1.0, seed=4)
    assert all(x <= y for x, y in zip(a, a[1:], strict=False))
    assert a[-1] == pytest.approx(500 / 4.0)


def test_poisson_arrivals():
    g = gaps(5.0, 1.0)
    assert g.mean() == pytest.approx(0.2, rel=1e-9)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.04)  # exponential: CV 1
    # Counts per 1-second window: Poisson, so variance / mean (the index of dispersion) is about 1.
    counts = np.bincount(np.asarray(arrival_offsets(20000, 5.0, 1.0, 0)).astype(int))
    assert counts.mean() == pytest.approx(5.0, rel=0.01)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)
    # Memoryless: P(gap > 2/rate) = e^-2.
    assert (g > 0.4).mean() == pytest.approx(math.exp(-2), abs=0.01)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_scale_the_variation(burstiness):
    g = gaps(2.0, burstiness)
    assert g.mean() == pytest.approx(0.5, rel=1e-9)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_infinite_rate_and_infinite_burstiness():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    assert arrival_offsets(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert arrival_offsets(0, 2.0) == []
    for bad in ((4, 0.0, 1.0), (4, 1.0, 0.0)):
        with pytest.raises(ValueError):
            arrival_offsets(*bad)
