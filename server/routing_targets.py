"""Routing targets: the local engine, or an OpenAI-compatible upstream reached with the overflow's
client (server/overflow_upstream.py), each upstream with its own circuit breaker. Here: serving a client
from an upstream (the pass-through) and calling one for a shadow comparison of a chat or completions
request (Messages and Responses requests reach an upstream through their route's translation:
server/routes/translated_upstream.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import Response

from server.anthropic_upstream import MESSAGES_PATH, anthropic_client
from server.config_schema import ConfigError
from server.overflow import CircuitBreaker, UpstreamConfig
from server.overflow_upstream import (
    Opened,
    SseRewriter,
    Tally,
    UpstreamClient,
    UpstreamError,
    UpstreamStream,
    next_chunk,
    read_body,
    rewrite_json,
    stream_events,
)
from server.request_record import RequestRecord
from server.routing import LOCAL_TARGET, OVERFLOW_TARGET, RoutingConfig, TargetConfig
from server.routing_compare import Outcome
from server.routing_read import read_outcome

ROUTE_TARGET = (
    "route_target"  # the scope state's key: the upstream Target a Messages / Responses route serves
)


@dataclass(slots=True, eq=False)
class Target:
    name: str
    client: UpstreamClient | None = None  # None: the local engine
    messages_client: UpstreamClient | None = None  # its own /v1/messages (anthropic_base_url), if any
    breaker: CircuitBreaker | None = None
    models: dict[str, str] | None = None  # client model id -> upstream id; None: the same id
    default_model: str | None = None
    idle_timeout_s: float = 60.0

    @property
    def is_local(self) -> bool:
        return self.client is None

    def upstream_model(self, model: str) -> str:
        if self.models is not None:
            return self.models.get(model, model)
        return self.default_model or model

    def available(self) -> bool:
        """May a request go to it now? (A local target always; an upstream while its breaker allows.)"""
        return self.breaker is None or self.breaker.allow()

    async def open(self, path: str, body: dict[str, Any]) -> Opened:
        """The upstream's answer once its first byte is in; its breaker learns the verdict."""
        assert self.client is not None and self.breaker is not None
        client = (
            self.messages_client
            if path == MESSAGES_PATH and self.messages_client is not None
            else self.client
        )
        try:
            opened = await client.open(path, body)
        except UpstreamError as exc:
            if exc.breaker:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            raise
        self.breaker.record_success()
        return opened


def _upstream(name: str, cfg: TargetConfig) -> Target:
    api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if cfg.api_key_env and not api_key:
        raise ConfigError(f"routing.targets.{name}: the environment variable {cfg.api_key_env} is unset")
    upstream = UpstreamConfig(
        connect_timeout_s=cfg.connect_timeout_s,
        first_byte_timeout_s=cfg.first_byte_timeout_s,
        idle_timeout_s=cfg.idle_timeout_s,
        budget_s=cfg.connect_timeout_s + cfg.first_byte_timeout_s,  # one attempt, its own timeouts
        retries=0,
    )
    return Target(
        name,
        UpstreamClient(cfg.base_url, api_key, upstream),
        anthropic_client(cfg.anthropic_base_url, api_key, upstream) if cfg.anthropic_base_url else None,
        CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s),
        default_model=cfg.model,
        idle_timeout_s=cfg.idle_timeout_s,
    )


def build_targets(cfg: RoutingConfig, overflow: Any) -> dict[str, Target]:
    """Every target the routes name. `overflow` is the OverflowService (None: overflow off); its target
    shares the overflow's breaker and model map, with a client of its own that never retries."""
    targets = {LOCAL_TARGET: Target(LOCAL_TARGET)}
    named = {n for r in cfg.models.values() for n in (r.primary, r.candidate) if n is not None}
    if OVERFLOW_TARGET in named:
        if overflow is None:
            raise ConfigError("routing names the 'overflow' target, but overflow is not enabled")
        policy = overflow.policy
        api_key = os.environ.get(policy.api_key_env, "")
        upstream = replace(policy.upstream, retries=0)
        targets[OVERFLOW_TARGET] = Target(
            OVERFLOW_TARGET,
            UpstreamClient(policy.base_url, api_key, upstream),
            anthropic_client(policy.anthropic_base_url, api_key, upstream)
            if policy.anthropic_base_url
            else None,
            overflow.breaker,
            models=dict(policy.models),
            idle_timeout_s=policy.upstream.idle_timeout_s,
        )
    for name, target_cfg in cfg.targets.items():
        targets[name] = _upstream(name, target_cfg)
    return targets


def upstream_body(body: dict[str, Any], model: str, *, stream: bool | None = None) -> dict[str, Any]:
    """The request as an upstream gets it: its model id, and usage asked for when streaming."""
    out = {**body, "model": model}
    if stream is not None:
        out["stream"] = stream
    if out.get("stream"):
        options = out.get("stream_options") if isinstance(out.get("stream_options"), dict) else {}
        out["stream_options"] = {**options, "include_usage": True}
    return out


async def upstream_response(
    target: Target,
    opened: Opened,
    body: dict[str, Any],
    record: RequestRecord,
    request_id: str,
    translation: Any = None,
    prompt_tokens: int = 0,
) -> Response:
    """The client's answer from an opened upstream response, with the client's model id and our request
    id (the overflow's pass-through; a `translation`, routes/translated_upstream.py, turns a chat answer
    into another API's), and the request's record filled in (what the access line and the ledger read)."""
    model = str(body.get("model") or record.model or "")
    stream = bool(body.get("stream"))
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    tally = Tally(local_prompt_tokens=prompt_tokens)
    record.id, record.model, record.stream = request_id, model, stream
    record.served_by, record.upstream_model = target.name, target.upstream_model(model)
    if stream:
        make_rewriter = translation.rewriter if translation is not None else SseRewriter
        rewriter = make_rewriter(model, request_id, bool(options.get("include_usage")), tally)

        def on_close() -> None:
            if tally.ended is None and not rewriter.done:
                tally.ended = "abort"
            if tally.ended == "error" and target.breaker is not None:
                target.breaker.record_failure()
            tally.fill(record)

        events = stream_events(opened, rewriter, target.idle_timeout_s)
        return UpstreamStream(events, opened, on_close, {"X-Request-Id": request_id})
    rewrite = translation.rewrite_json if translation is not None else rewrite_json
    try:
        response = rewrite(await read_body(opened, target.idle_timeout_s), model, request_id, tally)
    except UpstreamError as exc:
        tally.ended = "error"
        response = exc.api_error().response(translation.path if translation is not None else "")
    finally:
        await opened.aclose()
    tally.fill(record)
    return response


async def call_upstream(target: Target, path: str, body: dict[str, Any]) -> Outcome:
    """A shadow call: the request streamed to the upstream, read to its end; never raises for what the
    upstream does (an Outcome with an error says it)."""
    started = time.monotonic()
    model = target.upstream_model(str(body.get("model") or ""))
    try:
        opened = await target.open(path, upstream_body(body, model, stream=True))
    except UpstreamError as exc:
        outcome = Outcome(target.name, exc.status or 0, round(time.monotonic() - started, 4))
        outcome.error = str(exc)[:200]
        return outcome
    tally = Tally(local_prompt_tokens=0, started=started)
    rewriter = SseRewriter(model, "shadow", True, tally)
    parts = []
    try:
        chunk: bytes | None = opened.first
        while chunk is not None:
            parts.append(rewriter.feed(chunk))
            chunk = await next_chunk(opened, target.idle_timeout_s)
    except UpstreamError as exc:
        if target.breaker is not None:
            target.breaker.record_failure()
        outcome = Outcome(target.name, 200, round(time.monotonic() - started, 4))
        outcome.error = str(exc)[:200]
        return outcome
    finally:
        await opened.aclose()
    ttft = tally.first_content - started if tally.first_content is not None else None
    return read_outcome(target.name, 200, b"".join(parts), time.monotonic() - started, ttft)
