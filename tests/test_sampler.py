"""The batched sampler: a mixed batch gives every row the tokens (and logprobs) it gets sampled alone, with
and without speculative drafts; the batched penalties equal a per-request reference; and in the engine only
the sampler's choices cross to the host, in one transfer per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backends.logits_processors import apply_penalties
from backends.sampler import Sampler, SampleResult
from backends.spec_decode.config import SpeculativeConfig
from backends.spec_decode.rejection import verify_greedy
from benchmarks.step_profile import HostTransfers
from server.scheduler.request import Request, SamplingParams
from server.structured_output import StructuredOutput
from tests.engine_helpers import make_tiny_llama, run_requests, start_engine

VOCAB = 300
EOS = 2


class FixedGrammars:
    """Stands in for GrammarMatchers: a constrained request may only produce `allowed` tokens."""

    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill_bitmask(self, reqs: list[Request]) -> torch.Tensor | None:
        if not any(r.params.structured is not None for r in reqs):
            return None
        bitmask = torch.full((len(reqs), (VOCAB + 31) // 32), -1, dtype=torch.int32)
        for i, req in enumerate(reqs):
            if req.params.structured is not None:
                bitmask[i] = 0
                for token in self.allowed:
                    bitmask[i, token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)
        return bitmask

    def drop(self, request_id: str) -> None:
        pass


def request(rid: str, **params) -> Request:
    req = Request(rid, [5, 6, 7, 5], SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    req.output_token_ids = [9, 9, 11]
    return req


def mixed_batch() -> list[Request]:
    json_mode = StructuredOutput("json_object", None)
    return [
        request("greedy", temperature=0.0),
        request("greedy-penalties", temperature=0.0, repetition_penalty=1.4, presence_penalty=0.5,
                frequency_penalty=0.3, logprobs=3),
        request("greedy-bias", temperature=0.0, logit_bias={17: 30.0, 18: -5.0}),
        request("greedy-min-tokens", temperature=0.0, min_tokens=8, stop_token_ids=[40, 41]),
        request("seeded", temperature=0.9, top_p=0.9, seed=11),
        request("seeded-top-k", temperature=1.1, top_k=20, min_p=0.02, seed=12, presence_penalty=0.7, logprobs=0),
        request("seeded-bias-min", temperature=0.7, seed=13, logit_bias={3: 4.0}, min_tokens=5),
        request("unseeded-narrow", temperature=1.0, top_p=1e-6, logprobs=2),
        request("grammar", temperature=0.0, structured=json_mode),
        request("seeded-grammar", temperature=1.0, seed=14, structured=json_mode),
        request("unseeded", temperature=1.0, top_k=5),
    ]  # fmt: skip


def logits_for(reqs: list[Request], rows_per_request: list[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(sum(rows_per_request), VOCAB, generator=gen) * 3
    first = 0
    for req, rows in zip(reqs, rows_per_request, strict=True):
        if req.params.min_tokens:  # its stop tokens would win without min_tokens
            logits[first : first + rows, [EOS, 40, 41]] = 50.0
        first += rows
    return logits


def allowed_tokens() -> list[int]:
    return [EOS, 40, 41, 60, 61, 62]


def sample_alone(req: Request, logits: torch.Tensor, drafts: list[int] | None = None) -> list[SampleResult]:
    sampler = Sampler(VOCAB, seed=99, grammars=FixedGrammars(allowed_tokens()))
    copy = dataclasses.replace(req, output_token_ids=list(req.output_token_ids))
    return sampler(logits, [copy], [drafts] if drafts is not None else None)[0]


def test_a_mixed_batch_samples_each_row_as_alone():
    reqs = mixed_batch()
    logits = logits_for(reqs, [1] * len(reqs))
    for order in (list(range(len(reqs))), list(reversed(range(len(reqs))))):
        sampler = Sampler(VOCAB, seed=5, grammars=FixedGrammars(allowed_tokens()))
        batch = sampler(logits[order], [reqs[i] for i in order])
        by_id = {reqs[i].request_id: res for i, res in zip(order, batch, strict=True)}
        for i, req in enumerate(reqs):
            [got] = by_id[req.request_id]
            if req.request_id == "unseeded":  # the shared generator: only its filters are checked
                assert got.token_id in logits[i].topk(5).indices.tolist()
                continue
            assert [got] == sample_alone(req, logits[i : i + 1]), req.request_id
    results = dict(zip((r.request_id for r in reqs), Sampler(VOCAB, grammars=FixedGrammars(allowed_tokens()))(
        logits, reqs), strict=True))  # fmt: skip
    assert results["greedy"][0].token_id == int(logits[0].argmax())
    assert results["greedy-bias"][0].token_id == 17
    assert results["greedy-min-tokens"][0].token_id not in (EOS, 40, 41)
    assert results["grammar"][0].token_id in allowed_tokens()
    assert results["seeded-grammar"][0].token_id in allowed_tokens()
    assert results["seeded-bias-min"][0].token_id not in (EOS,)


def test_logprobs_come_from_the_raw_logits():
    reqs = mixed_batch()
    logits = logits_for(reqs, [1] * len(reqs))
    results = Sampler(VOCAB, grammars=FixedGrammars(allowed_tokens()))(logits, reqs)
    for i, (req, [res]) in enumerate(zip(reqs, results, strict=True)):
        k = req.params.logprobs
        if k is None:
            assert res.logprob is None and res.top_ids is None
            continue
        raw = torch.log_softmax(logits[i], dim=-1)
        assert res.logprob == pytest.approx(float(raw[res.token_id]), abs=1e-6)
        if k == 0:
            assert res.top_ids is None
        else:
            assert res.top_ids == raw.topk(k).indices.tolist()
            assert res.top_logprobs == pytest.approx(raw.topk(k).values.tolist(), abs=1e-6)


def test_min_tokens_keeps_a_grammar_rows_only_tokens():
    """A row whose grammar allows only stop tokens keeps them under min_tokens; its neighbours do not."""
    reqs = [
        request("done", temperature=0.0, min_tokens=9, structured=StructuredOutput("json_object", None)),
        request("free", temperature=0.0, min_tokens=9),
    ]
    logits = logits_for(reqs, [1, 1])
    results = Sampler(VOCAB, grammars=FixedGrammars([EOS]))(logits, reqs)
    assert results[0][0].token_id == EOS
    assert results[1][0].token_id != EOS


def test_drafts_are_verified_per_request_as_alone():
    reqs = [
        request("greedy", temperature=0.0, logprobs=1),
        request("seeded", temperature=0.8, top_k=8, seed=3, logprobs=2),
        request("no-drafts", temperature=0.0),
        request("seeded-penalties", temperature=1.0, seed=4, repetition_penalty=1.2),
    ]
    gen = torch.Generator().manual_seed(1)
    drafts = [[1, 2, 3], [4, 5], [], [6]]
    rows = [len(d) + 1 for d in drafts]
    logits = torch.randn(sum(rows), VOCAB, generator=gen)
    logits[0, 1] = logits[1, 2] = 20.0  # the greedy request's first two drafts are the argmax; the third not
    logits[4, 4] = 20.0  # the seeded request's first draft is near certain
    batch = Sampler(VOCAB, seed=5)(logits, reqs, drafts)
    first = 0
    for req, draft, rows_n, got in zip(reqs, drafts, rows, batch, strict=True):
        assert got == sample_alone(req, logits[first : first + rows_n], draft), req.request_id
        assert [r.token_id for r in got][:-1] == draft[: len(got) - 1]
        first += rows_n
    targets = logits[:4].argmax(dim=-1).tolist()
    assert [r.token_id for r in batch[0]] == verify_greedy([1, 2, 3], targets) == [1, 2, targets[2]]
    assert [r.token_id for r in batch[2]] == [int(logits[7].argmax())]
    assert batch[1][0].token_id == 4  # accepted with probability ~1


def test_batched_penalties_equal_a_per_request_reference():
    reqs = [
        request("a", repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2),
        request("b"),
        request("c", frequency_penalty=-0.5),
        request("d", repetition_penalty=0.8),
    ]
    reqs[3].output_token_ids = []
    reqs[0].prompt_token_ids = [5, 5, VOCAB + 3]  # an id outside the logits' vocabulary is ignored
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2))
    expected = logits.clone()
    for i, req in enumerate(reqs):
        p = req.params
        seen = sorted({t for t in req.all_token_ids() if t < VOCAB})
        row = expected[i, seen]
        if p.repetition_penalty != 1.0:
            expected[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        for token in set(req.output_token_ids):
            count = req.output_token_ids.count(token)
            expected[i, token] -= p.frequency_penalty * count + p.presence_penalty
    assert torch.allclose(apply_penalties(logits, reqs), expected, atol=1e-6)


class RepeatLast:
    """A drafter that proposes the last token twice: right sometimes, wrong more often."""

    def propose(self, requests: list[Request]) -> list[list[int]]:
        return [[r.all_token_ids()[-1]] * 2 for r in requests]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_only_the_choices_cross_to_the_host(tiny_dir):
    """Every sampler call of a mixed run (seeded, penalties, logprobs, a grammar, drafts) makes one
    device -> host transfer, far smaller than a row of logits."""
    engine = start_engine(tiny_dir, num_kv_blocks=64)
    engine.core.spec_config, engine.core.drafter = SpeculativeConfig("ngram", 2), RepeatLast()
    sampler = engine.core.runner.sampler
    calls: list[HostTransfers] = []

    def watched(logits, reqs, drafts=None):
        transfers = HostTransfers(lambda: "sample")
        with transfers:
            results = sampler(logits, reqs, drafts)
        calls.append(transfers)
        return results

    engine.core.runner.sampler = type(
        "Watched", (), {"__call__": staticmethod(watched), "release": sampler.release}
    )()
    prompt = list(range(300, 332))
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.9, seed=3, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, logit_bias={5: 1.0}, min_tokens=4),
        SamplingParams(max_tokens=12, temperature=0.0, structured=StructuredOutput("regex", "[a-z ]+")),
    ]
    results = run_requests(engine, [prompt] * len(params), params)
    assert all(r["tokens"] for r in results)
    assert engine.core.scheduler.spec_stats.num_drafts > 0
    assert calls and all(dict(c.calls) == {"sample": 1} for c in calls)
    vocab = engine.core.runner.hf_config.vocab_size
    assert max(c.largest for c in calls) < vocab // 100
