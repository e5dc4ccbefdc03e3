"""Batched edits of one step's logits on their device, one row per sampled position: penalties, logit_bias,
min_tokens, and the filters of random sampling (top-k, top-p, min-p).

Every function takes the logits and, per row, the request as that row sees it (backends/sampler.py's
draft_rows). Per-row settings and token ids travel host -> device as small tensors built from Python lists
(loops over requests and their token ids, never over the vocabulary); nothing comes back to the host, and
no result depends on a device value read on the host, so the device never waits for the host in here.
A row's result does not depend on the other rows of the batch."""

from __future__ import annotations

import itertools

import torch

from server.scheduler.request import Request


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over the output tokens; vLLM's repetition penalty over prompt
    and output tokens (positive logits divided, negative multiplied). Only the rows with penalties change."""
    rows = [i for i, r in enumerate(reqs) if r.params.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    penalized = [reqs[i] for i in rows]
    params = [
        [r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
        for r in penalized
    ]
    repetition, frequency, presence = torch.tensor(params, dtype=logits.dtype, device=device).T[:, :, None]
    output_counts = token_counts([r.output_token_ids for r in penalized], vocab, device)
    index = torch.tensor(rows, device=device)
    x = logits[index]
    if any(r.params.repetition_penalty != 1.0 for r in penalized):
        seen = token_counts([r.prompt_token_ids for r in penalized], vocab, device) > 0
        seen |= output_counts > 0
        seen &= repetition != 1.0
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    if any(r.params.frequency_penalty or r.params.presence_penalty for r in penalized):
        x -= frequency * output_counts + presence * (output_counts > 0).to(x.dtype)
    return logits.index_copy(0, index, x)


def token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list, as a float [len(token_ids), vocab] tensor built on the
    device from the flattened ids (ids outside the vocabulary are not counted)."""
    lengths = [len(ids) for ids in token_ids]
    total = sum(lengths)
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)  # the last column: ids out of vocab
    if total:
        ids = torch.tensor(list(itertools.chain.from_iterable(token_ids)), device=device).clamp_(0, vocab)
        owner = torch.repeat_interleave(
            torch.arange(len(token_ids), device=device),
            torch.tensor(lengths, device=device),
            output_size=total,  # known here: no device -> host read of the size
        )
        counts.index_put_((owner, ids), torch.ones((), device=device), accumulate=True)
    return counts[:, :vocab]


def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """OpenAI's logit_bias: each request's biases added to its row, as one indexed add."""
    rows, cols, values = [], [], []
    for i, req in enumerate(reqs):
        for token_id, bias in req.params.logit_bias.items():
            if token_id < logits.shape[1]:
                rows.append(i), cols.append(token_id), values.append(bias)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def suppress_stops_before_min_tokens(
    logits: torch.Tensor, reqs: list[Request], keep_one: bool = False
) -> torch.Tensor:
    """Stop tokens cannot end a request before min_tokens: one masked fill over every such row's stop
    tokens. `keep_one`: a row whose grammar allows only stop tokens (the structure is complete) keeps
    them; a row with no token left could not be sampled."""
    rows, cols = [], []
    vocab = logits.shape[1]
    for i, req in enumerate(reqs):
        if req.num_output_tokens >= req.params.min_tokens:
            continue
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= req.eos_token_ids
        stops = [t for t in stops if t < vocab]
        rows += [i] * len(stops)
        cols += stops
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    suppressed = logits.index_put(index, torch.tensor(float("-inf"), device=device))
    if not keep_one:
        return suppressed
    dead = torch.isinf(suppressed).all(dim=-1, keepdim=True)
    return torch.where(dead, logits, suppressed)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Keep each row's top_k tokens (0 or the vocabulary: all) and, of those, the smallest prefix by
    probability whose mass reaches top_p. Sorts the rows: for rows without top_p, apply_top_k is cheaper."""
    device, vocab = logits.device, logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= ks[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1).sub_(probs)  # mass strictly before each token
    drop |= cumulative > torch.tensor(top_ps, device=device)[:, None]
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """Keep the tokens of each row whose logit is at least its top_k-th largest (1 <= top_k < vocab):
    one topk of the largest k, no sort of the vocabulary."""
    ks = torch.tensor(top_ks, device=logits.device)
    largest = logits.topk(max(top_ks), dim=-1).values
    kth = largest.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def filtered_probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """The distribution each row samples from: temperature, then top-k / top-p on the rows that set them
    (rows with top_p sort; rows with only top_k take a topk), then min-p."""
    device, vocab = logits.device, logits.shape[1]
    temps = torch.tensor([max(r.params.temperature, 1e-5) for r in reqs], dtype=logits.dtype, device=device)
    logits = logits / temps[:, None]  # a new tensor: the filters below write into it
    nucleus = [i for i, r in enumerate(reqs) if r.params.top_p < 1.0]
    top_k_only = [i for i, r in enumerate(reqs) if r.params.top_p >= 1.0 and 0 < r.params.top_k < vocab]
    if nucleus:
        index = torch.tensor(nucleus, device=device)
        rows = apply_top_k_top_p(
            logits[index], [reqs[i].params.top_k for i in nucleus], [reqs[i].params.top_p for i in nucleus]
        )
        logits.index_copy_(0, index, rows)
    if top_k_only:
        index = torch.tensor(top_k_only, device=device)
        logits.index_copy_(0, index, apply_top_k(logits[index], [reqs[i].params.top_k for i in top_k_only]))
    probs = logits.softmax(dim=-1)
    if any(r.params.min_p > 0 for r in reqs):
        min_ps = torch.tensor([r.params.min_p for r in reqs], dtype=probs.dtype, device=device)
        probs.masked_fill_(probs < min_ps[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs
