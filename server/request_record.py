"""The record of one HTTP request: what the routes learn about it (response id, model, who served it,
tokens, finish reasons, TTFT) for the middleware that owns it (server/metrics.py: RequestObserver), which
writes it as the access line, the usage ledger's row (server/usage.py) and the response's X-Request-Id /
X-Served-By headers. The routing middleware reads it back to compare targets (server/routing_service.py).

One typed record per request, kept in the ASGI scope's state, instead of a dict whose keys each module
spells for itself."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from typing import Any

SCOPE_KEY = "request_record"  # where the record lives in scope["state"]


@dataclass(slots=True)
class RequestRecord:
    client_request_id: str | None = None  # the client's X-Request-Id, when valid (server/logs.py)
    id: str | None = None  # the response's id (chatcmpl-..., msg_..., resp_...), else a generated req-...
    api: str | None = None  # chat | completions | messages | responses: the ledger row's api
    model: str | None = None  # the model the client asked for
    stream: bool | None = None
    prompt: Any = None  # the prompt text, written to the access line only with server.log_prompts
    served_by: str | None = None  # local | holysheep | a routing target's name (X-Served-By)
    upstream_model: str | None = None  # the model id an upstream served it as (X-Upstream-Model)
    overflow_reason: str | None = None  # why it overflowed (server/overflow.py: Reason)
    overflow_fallback: str | None = None  # why an overflow came back to the local engine
    running_at_admission: int | None = None  # the engine's running requests when it was admitted
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_exact: bool | None = None  # False: counted here (an upstream sent no usage), not by the server
    finish_reasons: list[str] | None = None  # one per distinct finish reason of its choices, sorted
    ttft_s: float | None = None  # first output token, from arrival
    status: int | None = None  # the status to log and bill instead of the response's (499: client gone)

    @property
    def request_id(self) -> str:
        """The id a client, the log and the ledger know this request by: the client's X-Request-Id, else
        the response's id; generated (and kept) on first use when there is neither."""
        if self.client_request_id:
            return self.client_request_id
        if not self.id:
            self.id = f"req-{uuid.uuid4().hex[:12]}"
        return self.id

    def served_locally(self, response_id: str, model: str, stream: bool, prompt: Any) -> None:
        """The request goes to the local engine as `response_id`."""
        self.id, self.model, self.stream, self.served_by, self.prompt = (
            response_id,
            model,
            stream,
            "local",
            prompt,
        )

    def log_fields(self, with_prompt: bool) -> dict[str, Any]:
        """The fields that are set, for the access line (request_id first; the prompt only if asked)."""
        out: dict[str, Any] = {"request_id": self.request_id}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in ("client_request_id", "status", "prompt"):
                out[f.name] = value
        if with_prompt and self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def request_record(scope: dict[str, Any]) -> RequestRecord:
    """This request's record: the one the middleware made, or a new one for a scope it has not seen (a
    route under test, a shadow copy made by the routing middleware)."""
    state = scope.setdefault("state", {})
    record = state.get(SCOPE_KEY)
    if record is None:
        record = state[SCOPE_KEY] = RequestRecord()
    return record
