"""Speculative decoding's parts without a model: the ngram drafter, the config, the scheduler's draft
bookkeeping, and verification (greedy prefix; rejection sampling keeps the target distribution)."""

import collections
import itertools
import random

import pytest
import torch

from backends.sampler import Sampler
from backends.spec_decode.config import SpeculativeConfig, parse_speculative_config
from backends.spec_decode.drafter import propose_drafts
from backends.spec_decode.ngram import NgramDrafter
from backends.spec_decode.rejection import verify_greedy
from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, SamplingParams
from server.scheduler.scheduler import Scheduler
from tests.engine_helpers import one_torch_thread

# --- ngram -------------------------------------------------------------------------------------------


def ngram(k=3, low=2, high=4, max_model_len=1000) -> NgramDrafter:
    return NgramDrafter(SpeculativeConfig("ngram", k, low, high), max_model_len)


def test_ngram_proposes_what_followed_the_longest_earliest_match():
    # suffix [7, 8, 9]: its 3-gram occurs at 1 (followed by 1, 2, 3) and at 6; the earliest wins
    tokens = [0, 7, 8, 9, 1, 2, 7, 8, 9, 5, 6, 4, 8, 9, 8, 7, 8, 9]
    assert ngram().propose_one(tokens) == [1, 2, 7]
    # only the 2-gram [8, 9] matches: first at 2, followed by 9's successor 1
    assert ngram().propose_one([3, 8, 9, 1, 4, 5, 8, 9]) == [1, 4, 5]
    assert ngram(low=3).propose_one([3, 8, 9, 1, 4, 5, 8, 9]) == []  # too short a match
    assert ngram().propose_one([1, 2, 3, 4]) == []  # no repeat
    assert ngram().propose_one([5, 5, 5, 5]) == [5]  # overlapping match, one token after it


def test_ngram_draft_length_is_capped_by_k_and_the_context():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert ngram(k=2).propose_one(tokens) == [3, 4]
    assert ngram(k=5, max_model_len=10).propose_one(tokens) == [3, 4]
    assert ngram(k=5, max_model_len=8).propose_one(tokens) == []


# --- config ------------------------------------------------------------------------------------------


def test_config_reads_vllms_keys():
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert spec == SpeculativeConfig("ngram", 3, 4, 4, None)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    mtp = parse_speculative_config({"method": "deepseek_mtp", "disable_by_batch_size": 8})
    assert (mtp.method, mtp.num_speculative_tokens, mtp.disable_by_batch_size) == ("mtp", 1, 8)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "eagle", "num_speculative_tokens": 1}, "method must be one of ngram, mtp"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "must be a positive integer"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model is not supported"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
            "<=",
        ),
        ("ngram", "must be a mapping"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(raw)


# --- scheduler and drafting step ---------------------------------------------------------------------


def request(rid, prompt, **params) -> Request:
    return Request(rid, prompt, SamplingParams(**params), eos_token_ids=frozenset({0}))


def decoding(scheduler: Scheduler, *reqs: Request) -> None:
    """Prefill the requests in one step; each gets output token 50."""
    for req in reqs:
        scheduler.add(req)
    out = scheduler.schedule()
    scheduler.update_from_output(out, {req.request_id: [50] for req in reqs})


def test_drafts_are_scheduled_capped_and_accepted_tokens_advance_computed():
    scheduler = Scheduler(KVCacheManager(64, 4), 8, 64, max_model_len=100)
    req = request("a", [10, 11, 12, 13, 14], max_tokens=20)
    decoding(scheduler, req)
    req.spec_token_ids = [60, 61, 62]
    out = scheduler.schedule()
    item = out.scheduled[0]
    assert (item.start, item.num_new_tokens, item.sample, item.draft_token_ids) == (5, 4, True, [60, 61, 62])
    assert req.spec_token_ids == []  # a draft is used once
    scheduler.update_from_output(out, {"a": [60, 61, 70]})  # two accepted, the third replaced by 70
    assert req.output_token_ids == [50, 60, 61, 70] and req.num_computed_tokens == 8
    stats = scheduler.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 2)
    assert stats.num_accepted_tokens_per_pos == [1, 1, 0]
    req.spec_token_ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    out = scheduler.schedule()  # max_tokens 20, 4 out: at most 15 drafts leave room for the bonus token
    assert len(out.scheduled[0].draft_token_ids) == 15


def test_drafts_fit_the_token_budget_and_context_and_only_decoding_requests_draft():
    scheduler = Scheduler(KVCacheManager(64, 4), 8, 3, max_model_len=9, long_prefill_token_threshold=0)
    req = request("a", [10, 11, 12, 13, 14], max_tokens=20)
    req.spec_token_ids = [1, 2]  # still prefilling: ignored
    scheduler.add(req)
    out = scheduler.schedule()
    assert out.scheduled[0].draft_token_ids == [] and out.scheduled[0].num_new_tokens == 3
    scheduler.update_from_output(out, {})
    out = scheduler.schedule()
    scheduler.update_from_output(out, {"a": [50]})
    req.spec_token_ids = [1, 2, 3, 4]
    out = scheduler.schedule()  # budget 3: two drafts; context 9 with 6 tokens: two drafts
    assert out.scheduled[0].draft_token_ids == [1, 2]


def test_propose_drafts_skips_constrained_requests_and_large_batches():
    class Fixed:
        def propose(self, requests):
            return [[7, 8, 9, 10]] * len(requests)

    scheduler = Scheduler(KVCacheManager(64, 4), 8, 64, max_model_len=100)
    reqs = [request(f"r{i}", [10, 11, 12], max_tokens=10) for i in range(3)]
    reqs[2].params.structured = object()  # any constraint
    decoding(scheduler, *reqs)
    propose_drafts(Fixed(), SpeculativeConfig("ngram", 3, disable_by_batch_size=2), scheduler.running)
    assert [r.spec_token_ids for r in reqs] == [[], [], []]
    propose_drafts(Fixed(), SpeculativeConfig("ngram", 3, disable_by_batch_size=3), scheduler.running)
    assert [r.spec_token_ids for r in reqs] == [[7, 8, 9], [7, 8, 9], []]


# --- verification ------------------------------------------------------------------------------------


def test_greedy_verification_accepts_the_prefix_equal_to_the_argmax():
    assert verify_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert verify_greedy([5, 9, 7], [5, 6, 7, 8]) == [5, 6]
    assert verify_greedy([1], [2, 3]) == [2]
    assert verify_greedy([], [4]) == [4]


VOCAB = 6
CHI2_CRITICAL = {5: 20.515, 35: 66.619}  # chi-square critical values at significance 0.001, by dof


def target_logits(context: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'model': next-token logits as a deterministic function of the tokens so far."""
    gen = torch.Generator().manual_seed(hash(context) % (2**31))
    return torch.randn(VOCAB, generator=gen) * 1.5


def draft_from_other_distribution(rng: random.Random, k: int) -> list[int]:
    weights = [1, 1, 5, 6, 1, 1]  # nothing like the target's
    return rng.choices(range(VOCAB), weights, k=k)


def first_two_tokens(sampler: Sampler, seed: int, rng: random.Random | None) -> tuple[int, int]:
    """Two output tokens of a request at temperature 0.8 and top_k 5: with drafts of k=2 from `rng`
    (several speculative steps when drafts are rejected), or one plain step per token without."""
    req = request(f"s{seed}", [1, 2], max_tokens=10, temperature=0.8, top_k=5, seed=seed)
    out: list[int] = []
    while len(out) < 2:
        drafts = draft_from_other_distribution(rng, 2) if rng is not None else []
        contexts = [tuple(out + drafts[:j]) for j in range(len(drafts) + 1)]
        logits = torch.stack([target_logits(c) for c in contexts])
        tokens = [r.token_id for r in sampler(logits, [req], [drafts])[0]]
        assert tokens[:-1] == drafts[: len(tokens) - 1]
        out += tokens
        req.output_token_ids = list(out)
    sampler.release(req.request_id)
    return out[0], out[1]


def chi_square(counts: collections.Counter, expected: dict, n: int) -> float:
    return sum((counts[cell] - n * p) ** 2 / (n * p) for cell, p in expected.items() if p > 0)


@one_torch_thread()
def test_rejection_sampling_keeps_the_target_distribution_and_seeds_reproduce():
    """Pairs of first tokens over 3000 seeded requests whose drafts come from a different distribution:
    their frequencies fit the target's joint distribution (chi-square at significance 0.001, 35 dof),
    as do the first tokens (5 dof); and the same seed and drafts give the same tokens."""
    n = 3000
    sampler = Sampler(VOCAB, seed=0)
    rng = random.Random(0)
    pairs = collections.Counter(first_two_tokens(sampler, seed, rng) for seed in range(n))

    def probs(context):
        logits = target_logits(context) / 0.8
        logits[logits.argsort()[:1]] = float("-inf")  # top_k 5 of 6
        return logits.softmax(-1).tolist()

    joint = {(a, b): probs(())[a] * probs((a,))[b] for a, b in itertools.product(range(VOCAB), repeat=2)}
    assert chi_square(pairs, joint, n) < CHI2_CRITICAL[35]
    first = collections.Counter(a for a, _ in pairs.elements())
    assert chi_square(first, dict(enumerate(probs(()))), n) < CHI2_CRITICAL[5]
    plain = collections.Counter(first_two_tokens(sampler, seed, None)[0] for seed in range(n))
    assert chi_square(plain, dict(enumerate(probs(()))), n) < CHI2_CRITICAL[5]  # the reference itself fits
    # a fixed seed reproduces: same drafts, same tokens
    again = [first_two_tokens(sampler, seed, random.Random(seed)) for seed in range(20)]
    assert again == [first_two_tokens(sampler, seed, random.Random(seed)) for seed in range(20)]


# --- metrics -----------------------------------------------------------------------------------------


def test_spec_decode_counters_reach_metrics_under_vllms_names():
    from server.engine_api import Load
    from server.metrics import ServerMetrics
    from server.scheduler.spec_decode_stats import SpecDecodingStats, spec_decode_stats

    stats = SpecDecodingStats()
    stats.observe(3, 2)
    stats.observe(3, 0)

    class Engine:
        max_model_len = 128

        def load(self):
            return Load(1, 0, 0.5, 0.0, 0.0)

        def stats(self):
            return spec_decode_stats(stats, num_speculative_tokens=3)

    metrics = ServerMetrics()
    metrics.bind(Engine(), "m")
    text = metrics.render().decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="m"} 2.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 6.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 2.0' in text
    for position, count in enumerate([1, 1, 0]):
        line = f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{position}"}}'
        assert f"{line} {count}.0" in text
