"""Verification of draft tokens against the target model's distributions at their positions.

Greedy requests accept the longest prefix of the drafts that equals the target's argmax, then take the
argmax after it: the tokens are exactly those of decoding one by one. Sampled requests use speculative
rejection sampling (Leviathan et al., Chen et al.) with a deterministic drafter, whose draft distribution is
one-hot: a draft token d is accepted with probability p(d); on rejection the token is drawn from the
residual max(p - onehot(d), 0), i.e. p without d, renormalized; when every draft is accepted, one bonus
token is drawn from the distribution after the last draft. The output distribution is the target's.

Random draws come from the request's own generator, so a seeded request repeats itself for the same drafts;
a request without drafts draws exactly what the non-speculative sampler draws (one exponential race)."""

from __future__ import annotations

import torch


def verify_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """targets[j]: the argmax at draft position j (len(drafts) + 1 of them)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1]


def verify_sampled(drafts: list[int], probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """probs[j]: the target distribution at draft position j ([len(drafts) + 1, vocab])."""
    for j, draft in enumerate(drafts):
        p = probs[j]
        if float(torch.rand((), generator=generator)) < float(p[draft]):
            continue
        residual = p.clone()
        residual[draft] = 0.0
        if not bool((residual > 0).any()):  # p(draft) rounds to 1: nothing else can be drawn
            return drafts[: j + 1]
        return drafts[:j] + [exponential_race(residual, generator)]
    return drafts + [exponential_race(probs[len(drafts)], generator)]


def exponential_race(weights: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn with probability proportional to weights: argmax of weights / Exp(1) noise."""
    noise = torch.empty(weights.shape[-1]).exponential_(generator=generator)
    return int(torch.argmax(weights / noise))
