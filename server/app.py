"""create_app(config, engine) -> FastAPI.

The engine comes up in the background (so /health answers 503 while it loads) and goes down after a
drain: stop admitting, let in-flight requests finish within drain_timeout_s, then engine.shutdown().
Around the routes: the request observer (metrics, access log), API-key checks, and the request guard
(bodies read whole within a deadline and a size limit, in-flight and per-key limits: server/http_guard.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api_keys import ApiKey
from server.config import Config, ServerConfig, collect_api_keys
from server.engine_api import Engine
from server.errors import install_error_handlers, unauthorized
from server.frontend_pool import FrontendPool
from server.generation_defaults import load_sampling_defaults
from server.http_guard import GuardLimits, RequestGuard
from server.logs import SECRETS
from server.metrics import RequestObserver, ServerMetrics
from server.overflow import parse_overflow_config
from server.routes import (
    admin,
    chat,
    completions,
    health,
    messages,
    metrics,
    models,
    responses,
    tokenize,
    usage,
)
from server.routes.deps import ServingState
from server.routes.overflow import OverflowService
from server.routing_service import RoutingMiddleware, RoutingService
from server.usage import UsageRecorder

log = logging.getLogger("glm_serve.app")
EngineSource = Engine | Callable[[], Engine]  # an engine, or a factory run in a thread at startup
ABORT_GRACE_S = 2.0  # after aborting what outlived the drain: time for those responses to end


def create_app(
    config: Config,
    engine: EngineSource,
    *,
    manage_engine: bool = True,
    on_engine_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """manage_engine=False: the caller starts and shuts down the engine (tests share one engine among
    several apps). on_engine_failure is called if the engine cannot be built or started. Overflow
    (`overflow:`) and the usage ledger (`usage:`) come from the profile; a ConfigError says what is wrong."""
    serving = ServingState(config=config, metrics=ServerMetrics(), log_prompts=config.server.log_prompts)
    serving.usage = UsageRecorder.from_config(config)
    serving.overflow = OverflowService.from_config(config, serving.metrics)
    serving.pool = FrontendPool(config.server.frontend_workers, config.server.frontend_max_queued)
    upstream_key = os.environ.get(parse_overflow_config(config.extra.get("overflow")).api_key_env, "")
    SECRETS.add([*(key.decode() for key in load_api_keys(config.server)), upstream_key])  # never logged
    serving.routing = RoutingService.from_config(config, serving.metrics.registry, serving)
    lifespan = _make_lifespan(serving, engine, manage_engine, on_engine_failure)
    app = FastAPI(
        title="glm-serve",
        summary="OpenAI-compatible server for GLM models",
        lifespan=lifespan,
        strict_content_type=False,  # a JSON body without a Content-Type header is still read as JSON
    )
    app.state.serving = serving
    install_error_handlers(app)
    routers = (chat, completions, messages, responses, models, tokenize, health, metrics, usage, admin)
    for module in routers:
        app.include_router(module.router)
    app.add_middleware(RoutingMiddleware, serving=serving)
    app.add_middleware(RequestGuard, serving=serving, limits=GuardLimits.from_server(config.server))
    app.add_middleware(
        ApiKeyCheck, keys=load_api_keys(config.server), protect_metrics=config.server.protect_metrics
    )
    paths = frozenset(r.path for m in routers for r in m.router.routes if hasattr(r, "path"))
    app.add_middleware(
        RequestObserver, metrics=serving.metrics, serving=serving, route_paths=paths, usage=serving.usage
    )
    return app


def uvicorn_limits(server: ServerConfig) -> dict[str, int]:
    """uvicorn.Config options that bound headers. Not its limit_concurrency: its 503 has no Retry-After,
    so the request guard caps connections with uvicorn's count (count_connections)."""
    return {"h11_max_incomplete_event_size": server.max_header_bytes}


def count_connections(serving: ServingState, server: uvicorn.Server) -> None:
    """The request guard's connection cap counts the connections this uvicorn server has open."""
    serving.open_connections = lambda: len(server.server_state.connections)


def served_model_name(config: Config, engine: Engine) -> str:
    """--served-model-name, else the model directory's name, else what the engine calls its model."""
    if config.server.served_model_name:
        return config.server.served_model_name
    if config.engine.model:
        return Path(config.engine.model).name or config.engine.model
    return engine.model_name


def _make_lifespan(
    serving: ServingState,
    source: EngineSource,
    manage_engine: bool,
    on_failure: Callable[[BaseException], None] | None,
) -> Callable[[FastAPI], AsyncIterator[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if serving.usage is not None:
            serving.usage.start()
        startup = asyncio.create_task(_bring_up(serving, source, manage_engine, on_failure))
        try:
            yield
        finally:
            if serving.routing is not None:  # shadow calls are cancelled, not drained
                await serving.routing.aclose()
            await _wind_down(serving, startup, manage_engine)
            if serving.overflow is not None:
                await serving.overflow.aclose()
            if serving.usage is not None:
                await asyncio.to_thread(serving.usage.close)  # flushes: every row is committed
            serving.pool.shutdown()

    return lifespan


def apply_model_settings(serving: ServingState, engine: Engine) -> None:
    """What the server config says about the model: a replacement chat template, sampling defaults."""
    server, engine_cfg = serving.config.server, serving.config.engine
    if server.chat_template and getattr(engine, "tokenizer", None) is not None:
        path = Path(server.chat_template)
        engine.tokenizer.chat_template = path.read_text() if path.is_file() else server.chat_template
    model_dir = getattr(engine, "model_dir", None) or engine_cfg.model
    serving.sampling_defaults = load_sampling_defaults(engine_cfg.generation_config, model_dir)


async def _bring_up(
    serving: ServingState,
    source: EngineSource,
    manage_engine: bool,
    on_failure: Callable[[BaseException], None] | None,
) -> None:
    try:
        engine = source if hasattr(source, "generate") else await asyncio.to_thread(source)  # type: ignore[operator]
        if manage_engine:
            await engine.start()
        serving.engine = engine
        apply_model_settings(serving, engine)
        serving.served_model_name = served_model_name(serving.config, engine)
        serving.metrics.bind(engine, serving.served_model_name)
        serving.ready = True
        log.info("serving %s (max_model_len %d)", serving.served_model_name, engine.max_model_len)
    except Exception as exc:
        serving.failure = f"{type(exc).__name__}: {exc}"
        log.exception("the engine failed to start")
        if on_failure is not None:
            on_failure(exc)


async def wait_for_in_flight(serving: ServingState, deadline: float) -> bool:
    """Wait until no request is in flight or the monotonic deadline passes; True if idle."""
    while serving.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return serving.in_flight == 0


async def _wind_down(serving: ServingState, startup: asyncio.Task, manage_engine: bool) -> None:
    serving.draining = True
    deadline = time.monotonic() + serving.config.server.drain_timeout_s
    if not await wait_for_in_flight(serving, deadline):
        log.warning("drain timeout: %d requests still in flight are aborted", serving.in_flight)
        await serving.abort_in_flight()
        await wait_for_in_flight(serving, time.monotonic() + ABORT_GRACE_S)
    if not startup.done():
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
    if manage_engine and serving.engine is not None:
        await serving.engine.shutdown(drain_timeout=max(0.0, deadline - time.monotonic()))
    log.info("engine shut down")


# -- middleware -----------------------------------------------------------------------------------------
def load_api_keys(server: ServerConfig) -> dict[bytes, ApiKey]:
    return {key.encode(): roles for key, roles in collect_api_keys(server).items()}


class ApiKeyCheck:
    """401 unless 'Authorization: Bearer <key>' (or Anthropic's 'x-api-key: <key>') matches a configured
    key (compared in constant time, against every key). /health and /version stay open; /metrics is open unless protect_metrics. The
    matched key's roles (ApiKey) go to scope["state"]["api_key"] for admission and the usage ledger."""

    def __init__(self, app: ASGIApp, *, keys: dict[bytes, ApiKey], protect_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = {"/health", "/version"} | (set() if protect_metrics else {"/metrics"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        key = self._match(scope)
        if key is None:
            await unauthorized().response(scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> ApiKey | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer":
            presented = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        presented = presented.strip()
        matched = None
        for key, roles in self.keys.items():
            if hmac.compare_digest(presented, key):
                matched = roles
        return matched
