"""Turns the logits of one step into tokens, per request: penalties, logit_bias, min_tokens, the grammar
mask of structured outputs, greedy or temperature / top-k / top-p / min-p sampling, and logprobs.

Random choices use the exponential race (argmax of probs / Exp(1) noise) with noise drawn from each
request's own torch.Generator, so a seeded request gets the same tokens alone or inside any batch (with
speculative decoding: for the same drafts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from backends.spec_decode.rejection import verify_greedy, verify_sampled
from server.scheduler.request import Request
from server.structured_output_matcher import GrammarMatchers


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, grammars: GrammarMatchers | None = None):
        self.vocab_size = vocab_size
        self.grammars = grammars
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = torch.Generator().manual_seed(seed)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.drop(request_id)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            seed = req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            gen = self._generators[req.request_id] = torch.Generator().manual_seed(seed)
        return gen

    def __call__(
        self, logits: torch.Tensor, reqs: list[Request], drafts: list[list[int]] | None = None
    ) -> list[list[SampleResult]]:
        """The tokens of each request. Without drafts, logits has one row per request and each gets one
        token. With drafts (speculative decoding), request i owns 1 + len(drafts[i]) consecutive rows (the
        positions of its last token and of its drafts) and gets its accepted drafts and one token more
        (backends/spec_decode/rejection.py). Every row is processed as if the drafts before it were output
        already (penalties, min_tokens), so accepted tokens are what decoding one by one would make."""
        drafts = drafts or [[] for _ in reqs]
        rows = draft_rows(reqs, drafts)
        logits = logits.float()[:, : self.vocab_size]
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in reqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits, rows)
        targets = torch.argmax(logits, dim=-1).tolist()
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = {}
        if random_rows:
            random_probs = self._probs(logits[torch.tensor(random_rows)], [rows[i] for i in random_rows])
            probs = dict(zip(random_rows, random_probs, strict=True))
        results: list[list[SampleResult]] = []
        first = 0
        for req, draft in zip(reqs, drafts, strict=True):
            span = range(first, first + len(draft) + 1)
            if req.params.greedy:
                tokens = verify_greedy(draft, [targets[i] for i in span])
            else:
                tokens = verify_sampled(draft, torch.stack([probs[i] for i in span]), self._generator(req))
            results.append([self._result(t, raw_logprobs, first + j, req) for j, t in enumerate(tokens)])
            first = span.stop
        return results

    def _process(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """Penalties, logit_bias, the grammar mask and min_tokens, per row."""
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        if any(r.params.logit_bias for r in rows):
            logits = apply_logit_bias(logits, rows)
        mask = self.grammars.fill_mask(rows) if self.grammars is not None else None
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return suppress_stops_before_min_tokens(logits, rows, keep_one=mask is not None)

    @staticmethod
    def _result(token: int, raw_logprobs: torch.Tensor | None, row: int, req: Request) -> SampleResult:
        k = req.params.logprobs
        if raw_logprobs is None or k is None:
            return SampleResult(token)
        result = SampleResult(token, float(raw_logprobs[row, token]))
        if k > 0:
            top = torch.topk(raw_logprobs[row], k)
            result.top_ids = top.indices.tolist()
            result.top_logprobs = top.values.tolist()
        return result

    def _probs(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The distribution each row samples from: temperature, top-k, top-p, min-p."""
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in reqs])
        logits = logits / temps[:, None]
        top_ks = [r.params.top_k for r in reqs]
        top_ps = [r.params.top_p for r in reqs]
        if any(0 < k < self.vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = apply_top_k_top_p(logits, top_ks, top_ps)
        probs = logits.softmax(dim=-1)
        min_ps = torch.tensor([r.params.min_p for r in reqs])
        if (min_ps > 0).any():
            keep = probs >= min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs * keep
        return probs


def draft_rows(reqs: list[Request], drafts: list[list[int]]) -> list[Request]:
    """The request as each of its rows sees it: row j of request i has drafts[i][:j] as output already."""
    rows: list[Request] = []
    for req, draft in zip(reqs, drafts, strict=True):
        rows.append(req)
        for j in range(1, len(draft) + 1):
            rows.append(dataclasses.replace(req, output_token_ids=req.output_token_ids + draft[:j]))
    return rows


def apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks])
    ranks = torch.arange(vocab)[None, :]
    drop = ranks >= ks[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    drop |= cumulative > torch.tensor(top_ps)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over the output tokens; vLLM's repetition penalty over prompt
    and output tokens (positive logits divided, negative multiplied)."""
    logits = logits.clone()
    vocab = logits.shape[1]
    for i, req in enumerate(reqs):
        p = req.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.all_token_ids(), dtype=torch.long)
            seen = seen[seen < vocab].unique()
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if req.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(req.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out[out < vocab], minlength=vocab).float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """OpenAI's logit_bias: each request's biases added to its row, as one indexed add."""
    rows, cols, values = [], [], []
    for i, req in enumerate(reqs):
        for token_id, bias in req.params.logit_bias.items():
            if token_id < logits.shape[1]:
                rows.append(i), cols.append(token_id), values.append(bias)
    if not rows:
        return logits
    return logits.index_put((torch.tensor(rows), torch.tensor(cols)), torch.tensor(values), accumulate=True)


def suppress_stops_before_min_tokens(
    logits: torch.Tensor, reqs: list[Request], keep_one: bool = False
) -> torch.Tensor:
    """Stop tokens cannot end a request before min_tokens. `keep_one`: a row whose grammar allows only
    stop tokens (the structure is complete) keeps them; a row with no token left could not be sampled."""
    original = logits
    cloned = False
    for i, req in enumerate(reqs):
        if req.num_output_tokens >= req.params.min_tokens:
            continue
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= set(req.eos_token_ids)
        stops = [t for t in stops if t < logits.shape[1]]
        if stops:
            if not cloned:
                logits, cloned = logits.clone(), True
            logits[i, stops] = float("-inf")
    if cloned and keep_one:
        dead = torch.isinf(logits).all(dim=-1)
        if dead.any():
            logits[dead] = original[dead]
    return logits
