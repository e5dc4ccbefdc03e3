"""What every route needs: the serving state of the app, and the checks made before the engine sees a
request (ready, not draining, healthy, the right model name, room in the queue)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.config import Config
from server.engine_api import Engine
from server.errors import model_not_found, unavailable
from server.metrics import ServerMetrics


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


def ready_engine(state: ServingState) -> Engine:
    """The engine, or 503 while it loads, after it died, or while the server drains."""
    status = state.status
    if status == "serving":
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


def admit(state: ServingState, engine: Engine) -> None:
    """503 with Retry-After when the engine's waiting queue is full. A soft bound: requests that arrive
    in the same instant are all checked before the engine has queued any of them."""
    if state.draining:
        raise unavailable(
            "The server is shutting down and admits no new requests.", 5.0, code="server_draining"
        )
    load = engine.load()
    limit = state.config.server.max_queued_requests
    if load.num_waiting >= limit:
        raise unavailable(
            f"The server is overloaded ({load.num_waiting} requests waiting, limit {limit}); retry later.",
            retry_after_s=max(1.0, load.est_wait_s),
            code="queue_full",
        )
