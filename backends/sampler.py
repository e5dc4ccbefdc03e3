"""Turns the logits of one step into tokens on the logits' device: penalties, logit_bias, min_tokens, the
grammar mask of structured outputs (backends/logits_processors.py), greedy argmax or temperature / top-k /
top-p / min-p sampling, verification of speculative drafts (backends/spec_decode/rejection.py) and
logprobs, as batched tensor operations. One transfer per step brings the host what it needs: the sampled
ids, the accepted draft counts and the logprobs that were asked for.

Random choices use the exponential race (argmax of probs / Exp(1) noise). A seeded request draws its noise
from its own generator on the device, so it gets the same tokens alone or inside any batch (with
speculative decoding: for the same drafts); unseeded rows share one generator, seeded by the engine's seed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from backends.logits_processors import (
    apply_logit_bias,
    apply_penalties,
    filtered_probs,
    suppress_stops_before_min_tokens,
)
from backends.logits_processors import apply_top_k_top_p as apply_top_k_top_p  # re-exported for callers
from backends.spec_decode.rejection import (
    DraftBatch,
    accepted_counts,
    exponential_race,
    greedy_accepts,
    residual_race,
    sampled_accepts,
)
from server.scheduler.request import Request
from server.structured_output_matcher import GrammarMatchers, unpack_bitmask

MAX_VOCAB = 2**24  # float32 holds every integer up to it


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


@dataclass(slots=True)
class _Sampled:
    """One step's choices, on the device until `to_host`."""

    tokens: torch.Tensor  # [requests] the token after each request's accepted drafts
    accepted: torch.Tensor | None  # [requests] accepted drafts (None: no drafts this step)
    logprobs: torch.Tensor | None  # [logprob rows] the logprob of each such row's token
    top_ids: torch.Tensor | None  # [logprob rows, top k]
    top_logprobs: torch.Tensor | None

    def to_host(self) -> list[list[float]]:
        """Everything in one device -> host copy, as float32 (exact for token ids below 2**24, which the
        Sampler checks; every device has float32), split again."""
        parts = (self.tokens, self.accepted, self.logprobs, self.top_ids, self.top_logprobs)
        present = [p.reshape(-1) for p in parts if p is not None]
        flat = torch.cat([p.to(torch.float32) for p in present]).cpu().tolist()
        out, start = [], 0
        for p in parts:
            size = 0 if p is None else p.numel()
            out.append(flat[start : start + size])
            start += size
        return out


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, grammars: GrammarMatchers | None = None):
        if vocab_size > MAX_VOCAB:
            raise ValueError(f"the sampler returns token ids as float32: vocab_size must be <= {MAX_VOCAB}")
        self.vocab_size = vocab_size
        self.grammars = grammars
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}  # seeded requests' own, on the logits' device
        self._shared: torch.Generator | None = None  # every unseeded row's

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.drop(request_id)

    def __call__(
        self, logits: torch.Tensor, reqs: list[Request], drafts: list[list[int]] | None = None
    ) -> list[list[SampleResult]]:
        """The tokens of each request. Without drafts, logits has one row per request and each gets one
        token. With drafts (speculative decoding), request i owns 1 + len(drafts[i]) consecutive rows (the
        positions of its last token and of its drafts) and gets its accepted drafts and one token more
        (backends/spec_decode/rejection.py). Every row is processed as if the drafts before it were output
        already (penalties, min_tokens), so accepted tokens are what decoding one by one would make."""
        drafts = drafts or [[] for _ in reqs]
        sampled = self._sample(logits, reqs, drafts)
        tokens, accepted, logprobs, top_ids, top_logprobs = sampled.to_host()
        results: list[list[SampleResult]] = []
        logprob_row = 0  # rows of requests with logprobs, in order: their place in the logprob tensors
        width = sampled.top_ids.shape[1] if sampled.top_ids is not None else 0
        for n, (req, draft) in enumerate(zip(reqs, drafts, strict=True)):
            chosen = draft[: int(accepted[n])] if accepted else []
            chosen.append(int(tokens[n]))
            k = req.params.logprobs
            if k is None:
                results.append([SampleResult(t) for t in chosen])
            else:
                row_results = []
                for j, token in enumerate(chosen):
                    row = logprob_row + j
                    top = slice(row * width, row * width + k)
                    result = SampleResult(token, logprobs[row])
                    if k > 0:
                        result.top_ids = [int(t) for t in top_ids[top]]
                        result.top_logprobs = top_logprobs[top]
                    row_results.append(result)
                results.append(row_results)
                logprob_row += len(draft) + 1
        return results

    def _sample(self, logits: torch.Tensor, reqs: list[Request], drafts: list[list[int]]) -> _Sampled:
        device = logits.device
        rows = draft_rows(reqs, drafts)
        logits = logits.float()[:, : self.vocab_size]
        logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = torch.log_softmax(logits[torch.tensor(logprob_rows, device=device)], dim=-1)
        logits = self._process(logits, rows)
        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy_rows) == len(rows):
            row_tokens = torch.argmax(logits, dim=-1)
        else:  # argmax only where it is the choice; _sample_random_rows fills in the others
            row_tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
            if greedy_rows:
                index = torch.tensor(greedy_rows, device=device)
                row_tokens.index_copy_(0, index, torch.argmax(logits[index], dim=-1))
        spec = DraftBatch.build(drafts, device) if any(drafts) else None
        accept = greedy_accepts(spec, row_tokens) if spec is not None else None
        if len(greedy_rows) < len(rows):
            row_tokens, accept = self._sample_random_rows(
                logits, row_tokens, rows, reqs, drafts, spec, accept
            )
        sampled = _Sampled(row_tokens, None, None, None, None)
        if spec is not None:
            sampled.accepted = accepted_counts(accept)
            sampled.tokens = row_tokens[spec.rows.gather(1, sampled.accepted[:, None]).squeeze(1)]
        if raw_logprobs is not None:
            owners = [n for n, d in enumerate(drafts) for _ in range(len(d) + 1)]
            positions = [j for d in drafts for j in range(len(d) + 1)]
            top_k = max(rows[i].params.logprobs for i in logprob_rows)
            self._logprobs(
                sampled, raw_logprobs, logprob_rows, [owners[i] for i in logprob_rows],
                [positions[i] for i in logprob_rows], spec, top_k,
            )  # fmt: skip
        return sampled

    def _sample_random_rows(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        rows: list[Request],
        reqs: list[Request],
        drafts: list[list[int]],
        spec: DraftBatch | None,
        accept: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of the requests that sample: their token (an exponential race; at a draft's row, over
        the residual without the draft) in place of theirs in `targets`, and with drafts their
        rejection-sampling tests in place of the greedy ones. Returns every row's token and the tests."""
        device = logits.device
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        index = torch.tensor(random_rows, device=device)
        probs = filtered_probs(logits[index], [rows[i] for i in random_rows])
        uniforms, noise = self._draws(reqs, drafts, probs.shape, device)
        if spec is None:
            return targets.index_copy(0, index, exponential_race(probs, noise)), None
        row_draft = spec.row_draft[index]
        draft_probs = torch.zeros(len(rows), device=device).index_copy(
            0, index, probs.gather(1, row_draft.clamp(min=0)[:, None]).squeeze(1)
        )
        greedy = torch.tensor([r.params.greedy for r in reqs], device=device)[:, None]
        accept = torch.where(greedy, accept, sampled_accepts(spec, draft_probs, uniforms))
        return targets.index_copy(0, index, residual_race(probs, row_draft, noise)), accept

    def _process(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """Penalties, logit_bias, the grammar mask (moved to the device once, as a packed bitmask) and
        min_tokens, for the rows that ask for them."""
        logits = apply_penalties(logits, rows)
        logits = apply_logit_bias(logits, rows)
        bitmask = self.grammars.fill_bitmask(rows) if self.grammars is not None else None
        if bitmask is not None:
            allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), self.vocab_size)
            logits = logits.masked_fill(~allowed, float("-inf"))
        return suppress_stops_before_min_tokens(logits, rows, keep_one=bitmask is not None)

    def _draws(
        self, reqs: list[Request], drafts: list[list[int]], shape: torch.Size, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random draws of the random requests' rows: per request one uniform per draft, then the
        exponential noise of its rows. Seeded requests draw from their own generators, the others from the
        shared one. Returns the uniforms [requests, max drafts] (1 where none was drawn) and the noise.
        A seeded request without drafts draws exactly what the per-request sampler before this one drew
        (exponential_ over its row), so seeded outputs did not change with batching."""
        width = max(len(d) for d in drafts)
        uniforms = torch.ones(len(reqs), width, device=device)
        noise = torch.empty(shape, device=device)
        shared_rows, shared_reqs = [], []
        offset = 0
        for n, (req, draft) in enumerate(zip(reqs, drafts, strict=True)):
            if req.params.greedy:
                continue
            span = range(offset, offset + len(draft) + 1)
            if req.params.seed is None:
                shared_rows += span
                shared_reqs += [n] * bool(draft)
            else:
                gen = self._generator(req, device)
                if draft:
                    uniforms[n, : len(draft)] = torch.rand(len(draft), generator=gen, device=device)
                noise[span.start : span.stop].exponential_(generator=gen)
            offset = span.stop
        if shared_rows:
            gen = self._shared_generator(device)
            if shared_reqs:
                index = torch.tensor(shared_reqs, device=device)
                uniforms[index] = torch.rand(len(shared_reqs), width, generator=gen, device=device)
            if len(shared_rows) == shape[0]:
                noise.exponential_(generator=gen)
            else:
                fresh = torch.empty(len(shared_rows), shape[1], device=device).exponential_(generator=gen)
                noise[torch.tensor(shared_rows, device=device)] = fresh
        return uniforms, noise

    @staticmethod
    def _logprobs(
        sampled: _Sampled,
        raw_logprobs: torch.Tensor,
        rows: list[int],
        owners: list[int],
        positions: list[int],
        spec: DraftBatch | None,
        top_k: int,
    ) -> None:
        """The logprob of the token at each of `rows` (the rows of the requests that asked, with their
        request and position in it): an accepted draft or the sampled token, from the logits before any
        processing; and the top_k of those rows."""
        device = raw_logprobs.device
        owner = torch.tensor(owners, device=device)
        chosen = sampled.tokens[owner]
        if spec is not None:
            accepted = torch.tensor(positions, device=device) < sampled.accepted[owner]
            chosen = torch.where(accepted, spec.row_draft[torch.tensor(rows, device=device)], chosen)
        sampled.logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
        if top_k > 0:
            top = raw_logprobs.topk(top_k, dim=-1)
            sampled.top_ids, sampled.top_logprobs = top.indices, top.values

    def _generator(self, req: Request, device: torch.device) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(req.params.seed)
            self._generators[req.request_id] = gen
        return gen

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._shared is None or self._shared.device != device:
            self._shared = torch.Generator(device=device).manual_seed(self.seed)
        return self._shared


def draft_rows(reqs: list[Request], drafts: list[list[int]]) -> list[Request]:
    """The request as each of its rows sees it: row j of request i has drafts[i][:j] as output already."""
    rows: list[Request] = []
    for req, draft in zip(reqs, drafts, strict=True):
        rows.append(req)
        for j in range(1, len(draft) + 1):
            rows.append(dataclasses.replace(req, output_token_ids=req.output_token_ids + draft[:j]))
    return rows
