"""Routing between targets for a staged migration: the profile's `routing:` section, the sticky canary
assignment, and the rollback guards.

A target is the local engine (`local`, always defined), the overflow upstream (`overflow`, when the
overflow section is on) or an OpenAI-compatible upstream named under `routing.targets`. Per served model
a route names a primary, an optional candidate, a mode and a weight (0-100 %):
- off: the primary serves everything;
- shadow: the primary serves, and `weight` % of requests are also sent to the candidate and compared;
- canary: `weight` % of API keys (sticky: a hash of the key id and the salt) are served by the candidate.
What may not leave the host (sovereign keys, X-Overflow: never) is served by the local engine and never
mirrored to an upstream.

The serving side is server/routing_service.py; the comparison rows and the persisted weights are in
server/routing_store.py (tables of the state database at usage.path)."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server.config_schema import ConfigError, build_section

LOCAL_TARGET = "local"
OVERFLOW_TARGET = "overflow"


class Mode(str, Enum):
    OFF = "off"
    SHADOW = "shadow"
    CANARY = "canary"


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """An OpenAI-compatible upstream. Routing calls are never retried: a canary that fails before its first
    byte falls back to the primary, a failed shadow is counted and dropped."""

    base_url: str
    api_key_env: str | None = None  # the environment variable holding its key; None: no Authorization
    model: str | None = None  # the upstream's model id; None: the id the client used
    anthropic_base_url: str | None = None  # set: /v1/messages goes as it is to {this}/v1/messages
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    breaker_failures: int = 5  # consecutive failures that open its circuit breaker
    breaker_cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    primary: str = LOCAL_TARGET
    candidate: str | None = None
    mode: Mode = Mode.OFF
    weight: float = 0.0  # %: of keys served by the candidate (canary) or of requests mirrored (shadow)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Rollback guards over the last `window` candidate requests (each off when None)."""

    window: int = 50  # the last this many candidate requests (and as many of the primary's) are judged
    min_samples: int = 10  # no guard fires before this many candidate requests are in the window
    max_error_rate: float | None = 0.2  # the candidate's share of failed requests (5xx, timeouts)
    max_ttft_ratio: float | None = 3.0  # candidate p95 TTFT / primary p95 TTFT
    max_latency_ratio: float | None = 3.0  # same for end-to-end latency
    min_tool_call_rate: float | None = 0.8  # tool calls valid (canary) or agreeing with the primary (shadow)
    min_json_valid_rate: float | None = 0.8  # when a response_format was asked


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Shadow, canary and rollback between targets (docs/routing.md)."""

    enabled: bool = False  # off: every request is served as without routing
    salt: str = "glm-serve"  # of the sticky assignment; changing it reshuffles the keys
    store_text: bool = False  # comparison rows keep prompts and outputs
    shadow_max_in_flight: int = 16  # more shadow calls than this at once are dropped (and counted)
    route_header_roles: tuple[str, ...] = ("admin", "force_overflow")  # key roles that may send X-Route
    # name -> an OpenAI-compatible upstream {base_url, anthropic_base_url, api_key_env, model, timeouts,
    # breaker}; `local` and `overflow` are built in
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    # served model -> its route {primary, candidate, mode: off|shadow|canary, weight: 0-100}
    models: dict[str, RouteConfig] = field(default_factory=dict)
    guards: GuardConfig = field(default_factory=GuardConfig)


def parse_routing_config(section: dict[str, Any] | None) -> RoutingConfig:
    """The `routing:` section of a profile, checked. Absent: routing off."""
    cfg: RoutingConfig = build_section(RoutingConfig, section, "routing")
    _check(cfg)
    return cfg


def _check(cfg: RoutingConfig) -> None:
    for reserved in (LOCAL_TARGET, OVERFLOW_TARGET):
        if reserved in cfg.targets:
            raise ConfigError(f"routing.targets.{reserved}: the name is reserved (built-in target)")
    for name, target in cfg.targets.items():
        for url in (target.base_url, target.anthropic_base_url or "http://"):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"routing.targets.{name}: {url!r} must be an http(s) URL")
        if min(target.connect_timeout_s, target.first_byte_timeout_s, target.idle_timeout_s) <= 0:
            raise ConfigError(f"routing.targets.{name}: timeouts must be > 0")
        if target.breaker_failures < 1 or target.breaker_cooldown_s <= 0:
            raise ConfigError(f"routing.targets.{name}: breaker_failures >= 1 and breaker_cooldown_s > 0")
    known = {LOCAL_TARGET, OVERFLOW_TARGET, *cfg.targets}
    for model, route in cfg.models.items():
        for role in ("primary", "candidate"):
            name = getattr(route, role)
            if name is not None and name not in known:
                raise ConfigError(
                    f"routing.models.{model}.{role}: unknown target {name!r} (known: {', '.join(sorted(known))})"
                )
        if route.mode is not Mode.OFF and route.candidate is None:
            raise ConfigError(f"routing.models.{model}: mode {route.mode.value} needs a candidate")
        if route.candidate == route.primary:
            raise ConfigError(f"routing.models.{model}: the candidate must differ from the primary")
        check_weight(route.weight, f"routing.models.{model}.weight")
    g = cfg.guards
    if g.window < 1 or not 1 <= g.min_samples <= g.window:
        raise ConfigError("routing.guards: window >= 1 and 1 <= min_samples <= window")
    if cfg.shadow_max_in_flight < 1:
        raise ConfigError("routing.shadow_max_in_flight must be >= 1")


def check_weight(weight: Any, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 100:
        raise ConfigError(f"{where} must be a number from 0 to 100 (a percentage), not {weight!r}")
    return float(weight)


def bucket(key_id: str, salt: str) -> float:
    """Where a key falls in [0, 100): the canary takes the keys below its weight, so raising the weight
    only adds keys, and a key stays on its side while the weight stays."""
    digest = hashlib.sha256(f"{salt}\0{key_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


# -- rollback guards --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    """One request's result on one target, as the guards see it. tool_ok / json_ok: None when the request
    asked for no tools / no response_format."""

    ok: bool
    ttft_s: float | None
    latency_s: float
    tool_ok: bool | None = None
    json_ok: bool | None = None


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _rate(flags: list[bool | None]) -> float | None:
    seen = [f for f in flags if f is not None]
    return sum(seen) / len(seen) if seen else None


class GuardWindow:
    """The last `window` candidate samples and as many of the primary's, for one model."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.candidate: deque[Sample] = deque(maxlen=cfg.window)
        self.primary: deque[Sample] = deque(maxlen=cfg.window)

    def clear(self) -> None:
        self.candidate.clear()
        self.primary.clear()

    def tripped(self) -> tuple[str, str] | None:
        """(guard, detail) of the first guard that fires, or None (also while samples are too few)."""
        g, samples = self.cfg, list(self.candidate)
        if len(samples) < g.min_samples:
            return None
        errors = sum(not s.ok for s in samples) / len(samples)
        if g.max_error_rate is not None and errors > g.max_error_rate:
            return "error_rate", f"{errors:.2f} of {len(samples)} candidate requests failed"
        for guard, limit, attr in (("ttft_ratio", g.max_ttft_ratio, "ttft_s"),
                                   ("latency_ratio", g.max_latency_ratio, "latency_s")):  # fmt: skip
            ratio = self._ratio(attr)
            if limit is not None and ratio is not None and ratio > limit:
                return guard, f"candidate p95 {attr} is {ratio:.2f}x the primary's"
        for guard, limit, attr in (("tool_calls", g.min_tool_call_rate, "tool_ok"),
                                   ("json_validity", g.min_json_valid_rate, "json_ok")):  # fmt: skip
            rate = _rate([getattr(s, attr) for s in samples])
            if limit is not None and rate is not None and rate < limit:
                return guard, f"{attr} rate {rate:.2f} below {limit}"
        return None

    def _ratio(self, attr: str) -> float | None:
        cand = p95([getattr(s, attr) for s in self.candidate if s.ok and getattr(s, attr) is not None])
        prim = p95([getattr(s, attr) for s in self.primary if s.ok and getattr(s, attr) is not None])
        if cand is None or not prim or len(self.primary) < self.cfg.min_samples:
            return None
        return cand / prim
