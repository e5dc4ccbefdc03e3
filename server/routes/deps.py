"""What every route needs: the serving state of the app, and the checks made before the engine sees a
request (ready, not draining, healthy, the right model name, a size within the per-request limits, room
in the queue counted in sequences and tokens)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import Response

from server import tracing
from server.api_keys import ANONYMOUS_KEY, ApiKey
from server.config import Config
from server.engine_api import Engine
from server.errors import bad_request, model_not_found, unavailable
from server.frontend_pool import FrontendPool
from server.generation_defaults import NO_DEFAULTS, SamplingDefaults
from server.metrics import ServerMetrics
from server.overflow import (
    OVERFLOW_HEADER,
    Decision,
    OverflowConfig,
    QueueRoom,
    Route,
    decide,
    local_or_reject,
)
from server.request_record import request_record


@dataclass(slots=True, eq=False)
class ServingState:
    config: Config
    metrics: ServerMetrics
    engine: Engine | None = None
    served_model_name: str = ""
    ready: bool = False
    failure: str | None = None  # why the engine could not start
    draining: bool = False
    in_flight: int = 0  # HTTP requests whose body is read and not yet answered, /health and /metrics excluded
    generations: set[Any] = field(default_factory=set)  # the routes' open Generations
    started_at: float = field(default_factory=time.time)
    log_prompts: bool = False
    overflow: Any = None  # routes/overflow.py OverflowService; None: overflow off
    usage: Any = None  # usage.py UsageRecorder; None: no ledger
    sampling_defaults: SamplingDefaults = NO_DEFAULTS  # from the model's generation_config.json
    pool: FrontendPool | None = None  # rendering and tokenizing off the event loop (None: inline, tests)
    routing: Any = None  # routing_service.py RoutingService; None: routing off
    open_connections: Callable[[], int] | None = None  # uvicorn's count (server/cli.py); None: not known

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
    if model is not None and model not in (
        state.served_model_name,
        *state.config.server.served_model_aliases,
    ):
        raise model_not_found(model)
    return state.served_model_name


DISABLED = OverflowConfig()


def request_key(request: Request) -> ApiKey:
    """The roles of the request's API key (set by ApiKeyCheck); anonymous when no keys are configured."""
    return request.scope.get("state", {}).get("api_key") or ANONYMOUS_KEY


def client_of(request: Request, request_id: str) -> str:
    """Who the engine's waiting queue takes turns between (GenerateRequest.client): the API key, or with no
    keys configured each HTTP request on its own (so a completions batch is one client, not 64)."""
    key = request_key(request)
    return request_id if key.key_id == ANONYMOUS_KEY.key_id else f"key:{key.key_id}"


def check_batch_size(state: ServingState, *, prompts: int, n: int) -> None:
    """400 for more prompts, or more sequences (n x prompts), than one request may ask for."""
    server = state.config.server
    if prompts > server.max_prompts_per_request:
        raise bad_request(
            f"This request has {prompts} prompts; the limit is {server.max_prompts_per_request} "
            "(server.max_prompts_per_request).", param="prompt", code="too_many_prompts",
        )  # fmt: skip
    if prompts * n > server.max_sequences_per_request:
        raise bad_request(
            f"This request asks for {prompts * n} sequences (n={n} x {prompts} prompts); the limit is "
            f"{server.max_sequences_per_request} (server.max_sequences_per_request).", param="n",
            code="too_many_sequences",
        )  # fmt: skip


def check_prompt_tokens(state: ServingState, prompt_tokens: int, param: str) -> None:
    limit = state.config.server.max_prompt_tokens_per_request
    if prompt_tokens > limit:
        raise bad_request(
            f"This request has {prompt_tokens} prompt tokens; the limit is {limit} "
            "(server.max_prompt_tokens_per_request).", param=param, code="too_many_prompt_tokens",
        )  # fmt: skip


def queue_room(state: ServingState, sequences: int, tokens: int) -> QueueRoom:
    server = state.config.server
    return QueueRoom(sequences, tokens, server.max_queued_requests, server.max_queued_tokens)


async def run_in_pool(state: ServingState, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """CPU-heavy front-end work (render, tokenize) in the front-end pool, off the event loop."""
    if state.pool is None:
        return fn(*args, **kwargs)
    return await state.pool.run(fn, *args, **kwargs)


def admit(state: ServingState, engine: Engine, request: Request, *, sequences: int, tokens: int) -> Decision:
    """Local, overflow or 503 (server/overflow.py: decide). `sequences` and `tokens` are what this request
    adds to the waiting queue (n x prompts, and their prompt tokens times n)."""
    with tracing.span("admission"):
        return _admit(state, engine, request, sequences, tokens)


def _admit(state: ServingState, engine: Engine, request: Request, sequences: int, tokens: int) -> Decision:
    if state.draining:
        raise unavailable(
            "The server is shutting down and admits no new requests.", 5.0, code="server_draining"
        )
    load = engine.load()
    policy = state.overflow.policy if state.overflow is not None else DISABLED
    decision = decide(
        policy, load, engine.healthy(), request_key(request), request.headers.get(OVERFLOW_HEADER),
        state.served_model_name, queue_room(state, sequences, tokens),
    )  # fmt: skip
    if decision.error is not None:
        raise decision.error
    request_record(request.scope).running_at_admission = load.num_running
    return decision


async def serve_overflow(
    state: ServingState,
    engine: Engine,
    request: Request,
    decision: Decision,
    *,
    path: str,
    prompt_tokens: int,
    sequences: int,
    tokens: int,
    id_prefix: str | None = None,
    body: dict[str, Any] | None = None,
    translation: Any = None,
) -> Response | None:
    """The overflow upstream's answer when the decision says overflow and the upstream delivers; None:
    serve locally (a 503 is raised when the fallback finds the local queue full). body and translation:
    see OverflowService.serve (the Anthropic and Responses routes send their chat translation)."""
    if decision.route is not Route.OVERFLOW:
        return None
    room = queue_room(state, sequences, tokens)
    return await state.overflow.serve(
        request, decision, model=state.served_model_name, path=path,
        id_prefix=id_prefix or ("chatcmpl" if path.startswith("chat") else "cmpl"), prompt_tokens=prompt_tokens,
        local=lambda: local_or_reject(engine.load(), engine.healthy(), room), body=body, translation=translation,
    )  # fmt: skip
