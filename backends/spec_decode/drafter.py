"""The drafter interface and the engine's drafting step.

After each step the engine asks the drafter for draft tokens of the running requests that decode; the
scheduler verifies them in the next step together with each request's decode token. Requests with a
structured-output constraint get no drafts (their grammar matcher follows accepted tokens only), and no
request gets drafts while more requests run than speculative_config.disable_by_batch_size."""

from __future__ import annotations

from typing import Protocol

from backends.spec_decode.config import SpeculativeConfig
from server.scheduler.request import Request


class Drafter(Protocol):
    def propose(self, requests: list[Request]) -> list[list[int]]:
        """Up to num_speculative_tokens draft token ids to follow each request's tokens ([] for none).
        Called after every step, with the requests that may draft (possibly none)."""
        ...


def propose_drafts(drafter: Drafter, config: SpeculativeConfig, running: list[Request]) -> None:
    """Set spec_token_ids of the running requests that may draft this step."""
    limit = config.disable_by_batch_size
    over_limit = limit is not None and len(running) > limit
    eligible = [] if over_limit else [r for r in running if wants_drafts(r)]
    # Called every step, even with no request to draft for: a model drafter (mtp) keeps its KV cache
    # in step with the target's.
    for request, drafts in zip(eligible, drafter.propose(eligible), strict=True):
        request.spec_token_ids = drafts[: config.num_speculative_tokens]


def wants_drafts(request: Request) -> bool:
    """Decoding (one token to compute), unconstrained, and with more than one output token to go."""
    return (
        request.num_tokens - request.num_computed_tokens == 1
        and request.params.structured is None
        and request.num_output_tokens + 1 < request.params.max_tokens
    )
