"""Serving a routed request: which target serves it (primary or canary candidate), which one shadows it,
and what the guards learn from both.

RoutingMiddleware sits inside the API-key check and the body limit: it reads the body of a POST to
/v1/chat/completions, /v1/completions, /v1/messages or /v1/responses, asks RoutingService.plan() for a
Plan (None: not routed, the app serves it as always), and serves it. The local engine is served by the
app itself (admission and overflow unchanged); an upstream target by the overflow's pass-through for
chat and completions, and by the app's Messages / Responses route, which translates the request for
it (server/routing_agents.py). The client's response bytes are passed on untouched while a copy is kept
for the comparison. A shadow call starts once the primary has answered with a success status (after its
admission), runs as a task bounded by routing.shadow_max_in_flight, and is cancelled when the server
shuts down."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from server.agent_apis import parse_agent_apis_config
from server.api_keys import ANONYMOUS_KEY, ApiKey
from server.asgi_body import body_json, replay
from server.config import Config
from server.errors import APIError, bad_request
from server.overflow import OVERFLOW_HEADER
from server.overflow_upstream import UpstreamError
from server.request_record import SCOPE_KEY, RequestRecord, request_record
from server.routing import (
    LOCAL_TARGET,
    GuardWindow,
    Mode,
    RouteConfig,
    RoutingConfig,
    bucket,
    check_weight,
    parse_routing_config,
)
from server.routing_agents import TRANSLATED_APIS, chat_view, shadow_body
from server.routing_asgi import Capture, read_all
from server.routing_compare import Outcome
from server.routing_store import RoutingStore
from server.routing_targets import (
    ROUTE_TARGET,
    Target,
    build_targets,
    call_upstream,
    upstream_body,
    upstream_response,
)
from server.routing_track import RoutingMetrics, comparison_row, guard_sample, target_failed
from server.usage import parse_usage_config

log = logging.getLogger("glm_serve.routing")
ROUTED_PATHS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
                "/v1/messages": "messages", "/v1/responses": "responses"}  # fmt: skip
ROUTE_HEADER = "x-route"


@dataclass(slots=True, eq=False)
class Plan:
    model: str
    path: str  # the API: chat/completions | completions | messages | responses
    route: RouteConfig
    served: Target
    role: str  # primary | candidate: the served target's role
    fallback: Target | None  # the primary, when a canary candidate serves
    shadow: Target | None
    key: ApiKey
    body: dict[str, Any]
    chat: dict[str, Any]  # the request in chat terms (the body itself for chat and completions)
    primary_done: asyncio.Future[Outcome] | None = field(default=None)
    request_id: str = ""  # the client's request id, once its response has started


class RoutingService:
    def __init__(self, cfg: RoutingConfig, store: RoutingStore, registry: CollectorRegistry, targets: dict,
                 serving: Any) -> None:  # fmt: skip
        self.cfg, self.store, self.targets, self.serving = cfg, store, targets, serving
        self.agent_apis = parse_agent_apis_config(serving.config.extra.get("agent_apis"))
        self.metrics = RoutingMetrics(registry)
        persisted = store.weights()
        self.weights = {m: persisted.get(m, r.weight) for m, r in cfg.models.items()}
        self.windows = {m: GuardWindow(cfg.guards) for m in cfg.models}
        self.shadows: set[asyncio.Task] = set()  # shadow calls in flight
        self.writes: set[asyncio.Task] = set()  # store writes in flight (awaited at shutdown, not cancelled)
        for model, weight in self.weights.items():
            self.metrics.canary_weight.labels(model).set(weight)

    @classmethod
    def from_config(cls, config: Config, registry: CollectorRegistry, serving: Any) -> RoutingService | None:
        cfg = parse_routing_config(config.extra.get("routing"))
        if not cfg.enabled:
            return None
        targets = build_targets(cfg, serving.overflow)
        store = RoutingStore(parse_usage_config(config.extra.get("usage")).resolved_path())
        return cls(cfg, store, registry, targets, serving)

    # -- the plan -------------------------------------------------------------------------------------
    def plan(self, scope: Scope, body: Any) -> Plan | None:
        """Who serves and who shadows this request; None: not routed. APIError for a refused X-Route."""
        serving = self.serving
        if not isinstance(body, dict) or serving.draining or not serving.ready:
            return None
        api = ROUTED_PATHS[scope["path"]]
        translated = api in TRANSLATED_APIS  # their model names resolve through agent_apis.model_aliases
        model = (
            serving.served_model_name if translated else str(body.get("model") or serving.served_model_name)
        )
        route = self.cfg.models.get(model)
        if route is None or route.mode is Mode.OFF:
            return None
        chat = chat_view(api, body, self.agent_apis, model) if translated else body
        if chat is None:
            return None
        key: ApiKey = scope.get("state", {}).get("api_key") or ANONYMOUS_KEY
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1").strip().lower() for k, v in scope["headers"]
        }
        forced = self._forced_role(key, headers.get(ROUTE_HEADER))
        primary, candidate = self.targets[route.primary], self.targets[route.candidate]
        weight = self.weights[model]
        role = forced or "primary"
        if route.mode is Mode.CANARY and forced is None and bucket(key.key_id, self.cfg.salt) < weight:
            role = "candidate"
        may_leave = not key.sovereign and headers.get(OVERFLOW_HEADER) != "never"
        served = candidate if role == "candidate" else primary
        if role == "candidate" and not served.available():  # its breaker is open: no canary traffic
            served, role = primary, "primary"
        shadow = None
        if route.mode is Mode.SHADOW and role == "primary" and random.random() * 100 < weight:
            shadow = candidate if candidate.is_local or may_leave else None
        if not may_leave and not served.is_local:  # sovereign: served here, whatever the route says
            served, role, shadow = self.targets[LOCAL_TARGET], "primary", None
        fallback = primary if role == "candidate" else None
        return Plan(model, api, route, served, role, fallback, shadow, key, body, chat)

    def _forced_role(self, key: ApiKey, header: str | None) -> str | None:
        if not header:
            return None
        if header not in ("primary", "candidate"):
            raise bad_request(f"Invalid X-Route header {header!r}: use 'primary' or 'candidate'.",
                              code="invalid_header")  # fmt: skip
        if not any(getattr(key, role, False) for role in self.cfg.route_header_roles):
            raise APIError(403, "This API key may not choose a route (X-Route).", code="route_denied")
        return header

    # -- serving --------------------------------------------------------------------------------------
    async def serve(
        self, plan: Plan, scope: Scope, raw: bytes, receive: Receive, send: Send, app: ASGIApp
    ) -> None:
        record = request_record(scope)
        if plan.shadow is not None:
            plan.primary_done = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        capture = Capture(send, on_success=lambda: self._start_shadow(plan, scope, app))
        try:
            failure = await self._serve_on(plan.served, plan, scope, raw, receive, capture, app, record)
            if failure is not None and plan.fallback is not None:
                failed = Outcome(plan.served.name, failure.status or 0, time.monotonic() - started)
                failed.error = str(failure)[:200]
                self._canary_done(plan, failed)
                plan.served, plan.role, started = plan.fallback, "primary", time.monotonic()
                failure = await self._serve_on(plan.served, plan, scope, raw, receive, capture, app, record)
            if failure is not None:
                await target_failed(plan.served.name, failure).response(scope["path"])(
                    scope, receive, capture.send
                )
        finally:
            plan.request_id = record.id or ""
            outcome = capture.outcome(plan.served.name, time.monotonic() - started, record, plan.path)
            if plan.primary_done is not None and not plan.primary_done.done():
                plan.primary_done.set_result(outcome)
            if plan.route.mode is Mode.CANARY:
                self._canary_done(plan, outcome)

    async def _serve_on(self, target: Target, plan: Plan, scope: Scope, raw: bytes, receive: Receive,
                        capture: Capture, app: ASGIApp, record: RequestRecord) -> UpstreamError | None:  # fmt: skip
        """Serve the client from `target` (a candidate's breaker was asked by plan()); the error when an
        upstream failed before its first byte."""
        if target.is_local or plan.path in TRANSLATED_APIS:
            scope["state"][ROUTE_TARGET] = None if target.is_local else target
            try:
                await app(scope, replay(raw, receive), capture.send)
            except UpstreamError as exc:  # raised by the route before it answered
                log.warning("routing target %s failed before the first byte: %s", target.name, exc)
                return exc
            return None
        model = target.upstream_model(plan.model)
        try:
            opened = await target.open(plan.path, upstream_body(plan.body, model))
        except UpstreamError as exc:
            log.warning("routing target %s failed before the first byte: %s", target.name, exc)
            return exc
        request_id = f"{'chatcmpl' if plan.path.startswith('chat') else 'cmpl'}-{_random_hex()}"
        body = {**plan.body, "model": plan.model}
        response = await upstream_response(target, opened, body, record, request_id)
        await response(scope, receive, capture.send)
        return None

    # -- shadows --------------------------------------------------------------------------------------
    def _start_shadow(self, plan: Plan, scope: Scope, app: ASGIApp) -> None:
        if plan.shadow is None or plan.role != "primary":
            return
        if self.serving.draining or len(self.shadows) >= self.cfg.shadow_max_in_flight:
            self.metrics.shadow_dropped.inc()
            return
        if not plan.shadow.available():
            self.metrics.shadow_requests.labels("breaker_open").inc()
            return
        task = asyncio.create_task(self._shadow(plan, scope, app))
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    async def _shadow(self, plan: Plan, scope: Scope, app: ASGIApp) -> None:
        assert plan.shadow is not None and plan.primary_done is not None
        try:
            if plan.shadow.is_local or plan.path in TRANSLATED_APIS:
                candidate = await self._call_app(plan, scope, app)
            else:
                candidate = await call_upstream(plan.shadow, plan.path, plan.body)
            primary = await plan.primary_done
        except asyncio.CancelledError:
            self.metrics.shadow_requests.labels("cancelled").inc()
            if plan.shadow.breaker is not None:
                plan.shadow.breaker.release()  # a half-open probe that never got its verdict
            raise
        self.metrics.shadow_requests.labels("ok" if candidate.ok else "error").inc()
        row = comparison_row("shadow", plan, primary, candidate, self.cfg.store_text)
        window = self.windows[plan.model]
        primary_sample = guard_sample(primary, plan.chat, None)
        candidate_sample = guard_sample(candidate, plan.chat, row.tool_call_agreement)
        if primary.ok and primary_sample is not None and candidate_sample is not None:
            window.primary.append(primary_sample)
            window.candidate.append(candidate_sample)
        self._check_guards(plan)
        await asyncio.to_thread(self.store.add_comparison, row)

    async def _call_app(self, plan: Plan, scope: Scope, app: ASGIApp) -> Outcome:
        """The request streamed through this server's own app, as a client would: to the local engine
        (admission included), or for Messages and Responses through their route to an upstream shadow."""
        assert plan.shadow is not None
        translated = plan.path in TRANSLATED_APIS
        shadow = (
            shadow_body(plan.path, plan.body)
            if translated
            else upstream_body(plan.body, plan.model, stream=True)
        )
        body = json.dumps(shadow).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"x-route")]
        record = RequestRecord()
        state = {
            "api_key": plan.key,
            SCOPE_KEY: record,
            ROUTE_TARGET: None if plan.shadow.is_local else plan.shadow,
        }
        sub = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())], "state": state}
        capture = Capture(None)
        started = time.monotonic()
        try:
            await app(sub, replay(body, None), capture.send)
        except UpstreamError as exc:
            failed = Outcome(plan.shadow.name, exc.status or 0, round(time.monotonic() - started, 4))
            failed.error = str(exc)[:200]
            return failed
        return capture.outcome(plan.shadow.name, time.monotonic() - started, record, plan.path)

    # -- canary samples, guards and weights -----------------------------------------------------------
    def _canary_done(self, plan: Plan, outcome: Outcome) -> None:
        sample = guard_sample(outcome, plan.chat, None)
        if sample is None:
            return
        window = self.windows[plan.model]
        (window.candidate if plan.role == "candidate" else window.primary).append(sample)
        primary, candidate = (None, outcome) if plan.role == "candidate" else (outcome, None)
        self._check_guards(plan)
        self._spawn(
            self._record_canary(plan, comparison_row("canary", plan, primary, candidate, self.cfg.store_text))
        )

    async def _record_canary(self, plan: Plan, row: Any) -> None:
        await asyncio.to_thread(self.store.add_comparison, row)

    def _check_guards(self, plan: Plan) -> None:
        """Roll back at once when a guard trips (the next request is planned with weight 0); the weight and
        the event are persisted by a task."""
        model = plan.model
        tripped = self.windows[model].tripped()
        if tripped is None or self.weights[model] == 0:
            return
        guard, detail = tripped
        before = self.weights[model]
        self.weights[model] = 0.0
        self.windows[model].clear()
        self.metrics.canary_weight.labels(model).set(0.0)
        self.metrics.rollbacks.labels(model, guard).inc()
        candidate = str(plan.route.candidate)
        event = {"event": "routing_rollback", "model": model, "candidate": candidate, "guard": guard,
                 "detail": detail, "weight_before": before}  # fmt: skip
        log.warning(json.dumps(event))
        self._spawn(self._persist_rollback(model, candidate, guard, detail, before))

    async def _persist_rollback(
        self, model: str, candidate: str, guard: str, detail: str, before: float
    ) -> None:
        await asyncio.to_thread(self.store.set_weight, model, 0.0, f"rollback:{guard}")
        await asyncio.to_thread(self.store.add_rollback, model, candidate, guard, detail, before)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def set_weight(self, model: str, weight: Any, source: str) -> float:
        """Change a model's weight now and persist it; APIError 404/400 for an unknown model or bad weight."""
        if model not in self.cfg.models:
            raise APIError(404, f"No route for model {model!r} (routing.models).", code="route_not_found")
        try:
            value = check_weight(weight, "weight")
        except ValueError as exc:
            raise bad_request(str(exc), param="weight") from None
        if self.weights[model] != value and source.startswith("admin"):
            self.windows[model].clear()  # the guards judge the new share afresh
        self.weights[model] = value
        self.metrics.canary_weight.labels(model).set(value)
        await asyncio.to_thread(self.store.set_weight, model, value, source)
        return value

    def describe(self) -> dict[str, Any]:
        return {
            model: {
                "primary": r.primary,
                "candidate": r.candidate,
                "mode": r.mode.value,
                "weight": self.weights[model],
            }  # fmt: skip
            for model, r in self.cfg.models.items()
        }

    async def aclose(self) -> None:
        """Cancel the shadow calls still running (the server is going down), close clients and store."""
        for task in list(self.shadows):
            task.cancel()
        await asyncio.gather(*self.shadows, return_exceptions=True)
        await asyncio.gather(*self.writes, return_exceptions=True)
        for target in self.targets.values():
            for client in (target.client, target.messages_client):
                if client is not None:
                    await client.aclose()
        await asyncio.to_thread(self.store.close)


def _random_hex() -> str:
    return f"{random.getrandbits(128):032x}"


class RoutingMiddleware:
    def __init__(self, app: ASGIApp, *, serving: Any) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service: RoutingService | None = self.serving.routing
        if (
            service is None
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in ROUTED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_all(receive)
        except HTTPException as exc:  # the body limit
            await APIError(exc.status_code, str(exc.detail)).response()(scope, receive, send)
            return
        if raw is None:  # the client left while sending its body
            return
        try:
            body = body_json(scope, raw) if raw else None  # a large body: parsed by the guard, off the loop
            plan = service.plan(scope, body)
        except ValueError:
            plan = None  # not JSON: the app answers 400
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        if plan is None:
            await self.app(scope, replay(raw, receive), send)
            return
        await service.serve(plan, scope, raw, receive, send, self.app)
