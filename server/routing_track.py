"""What a routed request leaves behind: its comparison row, the samples the rollback guards read, and
the routing metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import APIError
from server.overflow_upstream import UpstreamError
from server.routing import Sample
from server.routing_compare import Outcome, json_valid, rouge_l, tool_calls_agree, tool_calls_valid
from server.routing_store import ComparisonRow

CLIENT_FAULTS = range(400, 500)
NOT_CLIENT_FAULTS = {408, 429}  # 4xx statuses that say the target, not the request, is the problem


def target_failed(target: str, failure: UpstreamError) -> APIError:
    """What the client gets when the only target for it failed: its refusal of a bad request as it is,
    anything else as 502."""
    if failure.status in CLIENT_FAULTS and failure.status not in NOT_CLIENT_FAULTS:
        return APIError(
            failure.status, str(failure).partition(": ")[2] or str(failure), code="upstream_refused"
        )
    return APIError(502, f"The routing target {target!r} failed: {failure}", code="upstream_error")


def guard_sample(outcome: Outcome, body: dict[str, Any], agreement: bool | None) -> Sample | None:
    """The guards' view of one outcome of a request (`body` in chat terms: the plan's chat view); None
    when the request itself was at fault (a 4xx other than 408/429 says nothing about the target).
    `agreement`: the shadow's tool-call agreement with the primary, which stands in for the tool calls'
    validity."""
    if outcome.status in CLIENT_FAULTS and outcome.status not in NOT_CLIENT_FAULTS:
        return None
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    tool_ok = json_ok = None
    if outcome.ok:
        tool_ok = agreement if agreement is not None else tool_calls_valid(outcome, tools)
        json_ok = json_valid(outcome, body.get("response_format"))
    return Sample(outcome.ok, outcome.ttft_s, outcome.latency_s, tool_ok, json_ok)


def comparison_row(
    kind: str, plan: Any, primary: Outcome | None, candidate: Outcome | None, store_text: bool
) -> ComparisonRow:
    """kind shadow: both outcomes; kind canary: the one that served (the other is None)."""
    body = plan.chat
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    response_format = body.get("response_format")
    row = ComparisonRow(
        ts=time.time(), kind=kind, model=plan.model, endpoint=f"/v1/{plan.path}",
        request_id=plan.request_id, key_id=plan.key.key_id, primary_target=plan.route.primary, candidate_target=str(plan.route.candidate), served=plan.role,
    )  # fmt: skip
    for side, outcome in (("primary", primary), ("candidate", candidate)):
        if outcome is None:
            continue
        row.prompt_tokens = row.prompt_tokens or outcome.prompt_tokens
        setattr(row, f"{side}_status", outcome.status)
        setattr(row, f"{side}_ttft_s", outcome.ttft_s)
        setattr(row, f"{side}_latency_s", outcome.latency_s)
        setattr(row, f"{side}_tokens", outcome.output_tokens)
        setattr(row, f"{side}_finish", outcome.finish_reason)
        setattr(row, f"{side}_json_valid", json_valid(outcome, response_format) if outcome.ok else None)
        if store_text:
            setattr(row, f"{side}_text", outcome.text)
    if candidate is not None:
        row.candidate_error = candidate.error
    if primary is not None and candidate is not None and primary.ok and candidate.ok:
        row.tool_call_agreement = tool_calls_agree(primary, candidate, tools)
        row.similarity = rouge_l(primary.text, candidate.text)
    if store_text:
        row.prompt = json.dumps(body.get("messages", body.get("prompt")), ensure_ascii=False)
    return row


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.shadow_requests = Counter(
            "glm_serve:shadow_requests", "Shadow calls by result (ok, error, cancelled, breaker_open).",
            ["result"], registry=registry,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "glm_serve:shadow_dropped", "Shadow calls not made: routing.shadow_max_in_flight reached.",
            registry=registry,
        )  # fmt: skip
        self.canary_weight = Gauge(
            "glm_serve:canary_weight", "The candidate's share (%) per model.", ["model"], registry=registry
        )
        self.rollbacks = Counter(
            "glm_serve:rollbacks",
            "Automatic rollbacks by model and guard.",
            ["model", "guard"],
            registry=registry,
        )
