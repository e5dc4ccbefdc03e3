"""Verification of draft tokens against the target model's distributions at their positions, for every
request of a step at once, as tensor operations on the logits' device.

Greedy requests accept the longest prefix of the drafts that equals the target's argmax, then take the
argmax after it: the tokens are exactly those of decoding one by one. Sampled requests use speculative
rejection sampling (Leviathan et al., Chen et al.) with a deterministic drafter, whose draft distribution is
one-hot: a draft token d is accepted with probability p(d); on rejection the token is drawn from the
residual max(p - onehot(d), 0), i.e. p without d, renormalized; when every draft is accepted, one bonus
token is drawn from the distribution after the last draft. The output distribution is the target's.

Random draws come from the request's own generator (backends/sampler.py): first one uniform per draft,
then one exponential race per position (over the residual at a draft's position, over p at the last), so a
seeded request repeats itself for the same drafts, and a request without drafts draws exactly what the
non-speculative sampler draws (one exponential race)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DraftBatch:
    """The drafts of one step. Request n owns the consecutive logits rows of its last token and of its
    drafts; `rows[n, j]` is the row of its position j (past its drafts: its last row)."""

    ids: torch.Tensor  # [requests, max drafts] draft token ids, -1 past a request's drafts
    rows: torch.Tensor  # [requests, max drafts + 1]
    row_draft: torch.Tensor  # [rows] the draft token at each row, -1 at a request's last row

    @classmethod
    def build(cls, drafts: list[list[int]], device: torch.device) -> DraftBatch:
        width = max((len(d) for d in drafts), default=0)
        ids, rows, row_draft = [], [], []
        first = 0
        for draft in drafts:
            ids.append(draft + [-1] * (width - len(draft)))
            rows.append([first + min(j, len(draft)) for j in range(width + 1)])
            row_draft += draft + [-1]
            first += len(draft) + 1
        return cls(
            torch.tensor(ids, dtype=torch.long, device=device).view(len(drafts), width),
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(row_draft, dtype=torch.long, device=device),
        )


def accepted_counts(accept: torch.Tensor) -> torch.Tensor:
    """accept[n, j]: draft j of request n passes its test (False past its drafts); the length of each
    request's accepted prefix."""
    return accept.long().cumprod(dim=1).sum(dim=1)


def greedy_accepts(drafts: DraftBatch, targets: torch.Tensor) -> torch.Tensor:
    """A draft passes when it is the target's argmax at its position (targets: [rows])."""
    return targets[drafts.rows[:, :-1]] == drafts.ids


def sampled_accepts(drafts: DraftBatch, draft_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """A draft d passes with probability p(d) (draft_probs: [rows], p of each row's draft; uniforms:
    [requests, max drafts])."""
    return (uniforms < draft_probs[drafts.rows[:, :-1]]) & (drafts.ids >= 0)


def residual_race(probs: torch.Tensor, row_draft: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per row, the token drawn where that row's draft is rejected: an exponential race over p without the
    draft (over p at a last row, whose draft is -1). When p(draft) rounds to 1 nothing else can be drawn,
    and the row keeps its draft."""
    has_draft = row_draft >= 0
    without_draft = probs.scatter(1, row_draft.clamp(min=0)[:, None], 0.0)
    residual = torch.where(has_draft[:, None], without_draft, probs)
    raced = exponential_race(residual, noise)
    empty = has_draft & ~(residual > 0).any(dim=-1)
    return torch.where(empty, row_draft, raced)


def exponential_race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per row, a token drawn with probability proportional to weights: argmax of weights / Exp(1) noise."""
    return torch.argmax(weights / noise, dim=-1)


def verify_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """One greedy request's tokens: targets[j] is the argmax at draft position j (len(drafts) + 1 of them)."""
    accept = torch.tensor(drafts, dtype=torch.long) == torch.tensor(targets[: len(drafts)], dtype=torch.long)
    return targets[: int(accepted_counts(accept[None, :])[0]) + 1]
