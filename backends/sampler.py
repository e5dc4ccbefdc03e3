"""Turns the logits of one step into tokens, per request: penalties, logit_bias, min_tokens, the grammar
mask of structured outputs, greedy or temperature / top-k / top-p / min-p sampling, and logprobs.

Random choices use the exponential race (argmax of probs / Exp(1) noise) with noise drawn from each
request's own torch.Generator, so a seeded request gets the same tokens alone or inside any batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> list[SampleResult]:
        logits = logits.float()[:, : self.vocab_size]
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in reqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(r.params.has_penalties for r in reqs):
            logits = apply_penalties(logits, reqs)
        if any(r.params.logit_bias for r in reqs):
            logits = apply_logit_bias(logits, reqs)
        mask = self.grammars.fill_mask(reqs) if self.grammars is not None else None
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        logits = suppress_stops_before_min_tokens(logits, reqs, keep_one=mask is not None)
        tokens = torch.argmax(logits, dim=-1)
        random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows)
            sampled = self._sample(logits[rows], [reqs[i] for i in random_rows])
            tokens[rows] = sampled
        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        if raw_logprobs is not None:
            for i, req in enumerate(reqs):
                k = req.params.logprobs
                if k is None:
                    continue
                results[i].logprob = float(raw_logprobs[i, token_list[i]])
                if k > 0:
                    top = torch.topk(raw_logprobs[i], k)
                    results[i].top_ids = top.indices.tolist()
                    results[i].top_logprobs = top.values.tolist()
        return results

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
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
        noise = torch.stack(
            [torch.empty(probs.shape[1]).exponential_(generator=self._generator(r)) for r in reqs]
        )
        return torch.argmax(probs / noise, dim=-1)


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
