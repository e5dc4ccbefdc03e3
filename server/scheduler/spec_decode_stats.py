"""Counters of speculative decoding (plain Python): the scheduler counts verified drafts, the engine reports
them under the stats() keys that server/metrics.py exports with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecDecodingStats:
    """Counters of speculative decoding, as vLLM's spec_decode metrics name them."""

    num_drafts: int = 0  # verified drafts (a request's draft tokens of one step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # [i]: drafts whose token i was accepted
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1


def spec_decode_stats(stats: SpecDecodingStats, num_speculative_tokens: int) -> dict[str, float]:
    """The scheduler's speculative-decoding counters under the stats() keys server/metrics.py exports
    (per draft position: `spec_decode_num_accepted_tokens_per_pos_total/<position>`)."""
    out = {
        "spec_decode_num_drafts_total": float(stats.num_drafts),
        "spec_decode_num_draft_tokens_total": float(stats.num_draft_tokens),
        "spec_decode_num_accepted_tokens_total": float(stats.num_accepted_tokens),
    }
    per_pos = stats.num_accepted_tokens_per_pos
    for position in range(max(num_speculative_tokens, len(per_pos))):
        count = per_pos[position] if position < len(per_pos) else 0
        out[f"spec_decode_num_accepted_tokens_per_pos_total/{position}"] = float(count)
    return out
