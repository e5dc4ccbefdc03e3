"""What every route needs: the serving state of the app, and the checks made before the engine sees a
request (ready, not draining, healthy, the right model name, room in the queue)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import Response

from server.config import ANONYMOUS_KEY, ApiKey, Config
from server.engine_api import Engine
from server.errors import model_not_found, unavailable
from server.metrics import ServerMetrics
from server.overflow import OVERFLOW_HEADER, Decision, OverflowConfig, Route, decide, local_or_reject


@dataclass(slots=True, eq=False)
class ServingState:
    config: Config
    metrics: ServerMetrics
    engine: Engine | None = None
    served_model_name: str = ""
    ready: bool = False
    failure: str | None = None  # why the engine could not start
    draining: bool = False
    in_flight: int = 0  # HTTP requests in progress, /health and /metrics excluded
    generations: set[Any] = field(default_factory=set)  # the routes' open Generations
    started_at: float = field(default_factory=time.time)
    log_prompts: bool = False
    overflow: Any = None  # routes/overflow.py OverflowService; None: overflow off
    usage: Any = None  # usage.py UsageRecorder; None: no ledger
    routing: Any = None  # routing_service.py RoutingService; None: routing off

    @property
    def status(self) -> str:
        """serving | loading | draining | failed | dead"""
        if self.failure is not None:
            return "failed"
        if self.draining:
            return "draining"
        if not self.ready or self.engine is None:
            return "loading"
        return "serving" if self.engine.healthy() else "dead"

    async def abort_in_flight(self) -> None:
        """End every open generation now (the drain timed out): streams end with an error event."""
        for generation in list(self.generations):
            await generation.abort()


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def ready_engine(state: ServingState, allow_unhealthy: bool = False) -> Engine:
    """The engine, or 503 while it loads, after it died, or while the server drains. allow_unhealthy:
    a dead engine is returned too (admission may send its requests to the overflow upstream)."""
    status = state.status
    if status == "serving" or (status == "dead" and allow_unhealthy):
        assert state.engine is not None
        return state.engine
    messages = {
        "loading": ("The model is still loading; retry shortly.", "model_loading", 5.0),
        "draining": ("The server is shutting down and admits no new requests.", "server_draining", 5.0),
        "failed": ("The engine failed to start; see the server log.", "engine_failed", 30.0),
        "dead": ("The engine stopped working; see the server log.", "engine_dead", 30.0),
    }
    message, code, retry_after = messages[status]
    raise unavailable(message, retry_after_s=retry_after, code=code)


def check_model(state: ServingState, model: str | None) -> str:
    """The served name; a request may omit the model, but may not name another one."""
    if model is not None and model != state.served_model_name:
        raise model_not_found(model)
    return state.served_model_name


DISABLED = OverflowConfig()


def request_key(request: Request) -> ApiKey:
    """The roles of the request's API key (set by ApiKeyCheck); anonymous when no keys are configured."""
    return request.scope.get("state", {}).get("api_key") or ANONYMOUS_KEY


def admit(state: ServingState, engine: Engine, request: Request) -> Decision:
    """Local, overflow or 503 (server/overflow.py: decide). The local queue limit is soft: requests that
    arrive in the same instant are all checked before the engine has queued any of them."""
    if state.draining:
        raise unavailable(
            "The server is shutting down and admits no new requests.", 5.0, code="server_draining"
        )
    load = engine.load()
    policy = state.overflow.policy if state.overflow is not None else DISABLED
    decision = decide(
        policy, load, engine.healthy(), request_key(request), request.headers.get(OVERFLOW_HEADER),
        state.served_model_name, state.config.server.max_queued_requests,
    )  # fmt: skip
    if decision.error is not None:
        raise decision.error
    request.scope.setdefault("state", {}).setdefault("access", {})["running_at_admission"] = load.num_running
    return decision


async def serve_overflow(
    state: ServingState,
    engine: Engine,
    request: Request,
    decision: Decision,
    *,
    path: str,
    prompt_tokens: int,
) -> Response | None:
    """The overflow upstream's answer when the decision says overflow and the upstream delivers; None:
    serve locally (a 503 is raised when the fallback finds the local queue full)."""
    if decision.route is not Route.OVERFLOW:
        return None
    limit = state.config.server.max_queued_requests
    return await state.overflow.serve(
        request, decision, model=state.served_model_name, path=path,
        id_prefix="chatcmpl" if path.startswith("chat") else "cmpl", prompt_tokens=prompt_tokens,
        local=lambda: local_or_reject(engine.load(), engine.healthy(), limit),
    )  # fmt: skip
