"""Overflow to the HolySheep cloud API (OpenAI-compatible) when the local deployment is saturated or
unhealthy, and the caller allows data to leave.

Three parts, each testable alone:
- OverflowConfig: the profile's `overflow:` section (off by default; unknown keys are errors).
- decide(): the admission decision (local | overflow(reason) | reject), a pure function of the engine's
  Load, its health, the API key's roles and the X-Overflow header. It runs before any byte is sent.
- CircuitBreaker: opens after K consecutive upstream failures, half-opens after a cooldown (one probe).

The upstream client and the pass-through live in server/overflow_upstream.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server.api_keys import ApiKey
from server.config_schema import ConfigError, build_section
from server.engine_api import Load
from server.errors import APIError, bad_request, unavailable

HOLYSHEEP_BASE_URL = "https://api.holysheep.ai/v1"
OVERFLOW_HEADER = "x-overflow"


class Reason(str, Enum):
    """Why a request overflowed (the label of glm_serve:overflow_requests_total)."""

    QUEUE = "queue"  # local waiting queue at or above the threshold
    WAIT = "wait"  # estimated queue wait above the threshold
    KV = "kv"  # KV-cache usage above the threshold
    UNHEALTHY = "unhealthy"  # the local engine is not healthy
    FORCED = "forced"  # X-Overflow: force from a key allowed to


# -- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Triggers:
    """Each trigger is off when None (unhealthy: when False)."""

    queue_waiting: int | None = None  # overflow when num_waiting >= this
    est_wait_s: float | None = None  # overflow when the estimated queue wait > this
    kv_usage: float | None = None  # overflow when KV usage (0..1) > this
    unhealthy: bool = True  # overflow while the local engine is unhealthy


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 2.0  # TCP + TLS connect to the upstream
    first_byte_timeout_s: float = 6.0  # the first body byte comes within connect_timeout_s + this
    budget_s: float = 8.0  # connect + first byte over all attempts; past it the request falls back at once
    idle_timeout_s: float = 10.0  # between body chunks after the first byte (a stall ends the stream)
    retries: int = 1  # extra attempts, only before the first byte and within budget_s
    retry_backoff_s: float = 0.2  # before the first retry; doubles per retry


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5  # consecutive failed attempts that open the circuit
    cooldown_s: float = 30.0  # open -> half-open (one probe) after this
    probe_timeout_s: float = 2.0  # the half-open probe's budget (connect + first byte)


@dataclass(frozen=True, slots=True)
class OverflowConfig:
    """Overflow to an OpenAI-compatible upstream (HolySheep) when this deployment is saturated or unhealthy."""

    enabled: bool = False  # off: nothing leaves this host
    base_url: str = HOLYSHEEP_BASE_URL  # the upstream's OpenAI-compatible API
    # set: /v1/messages requests go as they are to {this}/v1/messages (the upstream's own Anthropic API,
    # e.g. https://api.z.ai/api/anthropic); null: translated to chat completions at base_url
    anthropic_base_url: str | None = None
    api_key_env: str = "HOLYSHEEP_API_KEY"  # the environment variable holding the upstream key
    models: dict[str, str] = field(default_factory=dict)  # local model id -> upstream model id
    triggers: Triggers = field(default_factory=Triggers)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)


def parse_overflow_config(section: dict[str, Any] | None) -> OverflowConfig:
    """The `overflow:` section of a profile, checked. Absent: overflow off."""
    cfg: OverflowConfig = build_section(OverflowConfig, section, "overflow")
    if not isinstance(cfg.models, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in cfg.models.items()
    ):
        raise ConfigError("overflow.models must map local model ids to upstream model ids (strings)")
    t, u, b = cfg.triggers, cfg.upstream, cfg.circuit_breaker
    if t.queue_waiting is not None and t.queue_waiting < 1:
        raise ConfigError("overflow.triggers.queue_waiting must be >= 1 (or null: off)")
    if t.est_wait_s is not None and t.est_wait_s < 0:
        raise ConfigError("overflow.triggers.est_wait_s must be >= 0 (or null: off)")
    if t.kv_usage is not None and not 0.0 <= t.kv_usage <= 1.0:
        raise ConfigError("overflow.triggers.kv_usage must be in [0, 1] (or null: off)")
    for name in ("connect_timeout_s", "first_byte_timeout_s", "budget_s", "idle_timeout_s"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"overflow.upstream.{name} must be > 0")
    if u.retries < 0 or u.retry_backoff_s < 0:
        raise ConfigError("overflow.upstream.retries and retry_backoff_s must be >= 0")
    if b.failures < 1 or b.cooldown_s <= 0 or b.probe_timeout_s <= 0:
        raise ConfigError(
            "overflow.circuit_breaker.failures must be >= 1, cooldown_s and probe_timeout_s > 0"
        )
    for name in ("base_url", "anthropic_base_url"):
        url = getattr(cfg, name)
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"overflow.{name} must be an http(s) URL, not {url!r}")
    return cfg


# -- the admission decision -------------------------------------------------------------------------------
class Route(str, Enum):
    LOCAL = "local"
    OVERFLOW = "overflow"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    reason: Reason | None = None  # why it overflows (OVERFLOW only)
    error: APIError | None = None  # what the caller gets (REJECT only)


LOCAL = Decision(Route.LOCAL)


def pressure(triggers: Triggers, load: Load, healthy: bool) -> Reason | None:
    """The first trigger that fires, or None when the local deployment has room."""
    if triggers.unhealthy and not healthy:
        return Reason.UNHEALTHY
    if triggers.queue_waiting is not None and load.num_waiting >= triggers.queue_waiting:
        return Reason.QUEUE
    if triggers.est_wait_s is not None and load.est_wait_s > triggers.est_wait_s:
        return Reason.WAIT
    if triggers.kv_usage is not None and load.kv_usage > triggers.kv_usage:
        return Reason.KV
    return None


@dataclass(frozen=True, slots=True)
class QueueRoom:
    """What one request adds to the local waiting queue, and what the queue may hold. Counted in
    sequences (one per prompt and choice) and prompt tokens, so one request of many prompts weighs as
    much as that many requests."""

    sequences: int
    tokens: int
    max_sequences: int
    max_tokens: int

    def overflows(self, load: Load) -> str | None:
        """Why this request does not fit beside what is waiting; None when it does."""
        if load.num_waiting + self.sequences > self.max_sequences:
            return f"{load.num_waiting} sequences waiting, this request adds {self.sequences}, limit {self.max_sequences}"
        if load.num_waiting_tokens and load.num_waiting_tokens + self.tokens > self.max_tokens:
            return f"{load.num_waiting_tokens} prompt tokens waiting, this request adds {self.tokens}, limit {self.max_tokens}"
        return None


def local_or_reject(load: Load, healthy: bool, room: QueueRoom) -> Decision:
    """Queue locally if the engine is healthy and its queue has room; otherwise 503 with Retry-After."""
    if not healthy:
        error = unavailable("The engine stopped working; see the server log.", 30.0, code="engine_dead")
        return Decision(Route.REJECT, error=error)
    full = room.overflows(load)
    if full is not None:
        error = unavailable(
            f"The server is overloaded ({full}); retry later.",
            retry_after_s=min(max(1.0, load.est_wait_s), 60.0),
            code="queue_full",
        )
        return Decision(Route.REJECT, error=error)
    return LOCAL


def overflow_mode(header: str | None) -> str:
    """auto (no header) | never | force."""
    mode = (header or "auto").strip().lower()
    if mode not in ("auto", "never", "force"):
        raise bad_request(
            f"Invalid X-Overflow header {header!r}: use 'never', 'auto' or 'force'.", code="invalid_header"
        )
    return mode


def decide(
    policy: OverflowConfig,
    load: Load,
    healthy: bool,
    key: ApiKey,
    header: str | None,
    model: str,
    room: QueueRoom,
) -> Decision:
    """local | overflow(reason) | reject. A request leaves only if overflow is enabled, the model has an
    upstream id, the key is not sovereign and the request does not say X-Overflow: never; then it
    leaves when a trigger fires (or when forced by a key allowed to force). What cannot leave queues
    locally or gets 503: it never leaves, whatever the load."""
    mode = overflow_mode(header)
    may_leave = policy.enabled and model in policy.models and not key.sovereign and mode != "never"
    if mode == "force":
        if not key.force_overflow:
            error = APIError(403, "This API key may not force overflow.", code="overflow_force_denied")
            return Decision(Route.REJECT, error=error)
        if not may_leave:
            error = bad_request(
                f"Overflow is not enabled for model {model!r} on this server.", code="overflow_disabled"
            )
            return Decision(Route.REJECT, error=error)
        return Decision(Route.OVERFLOW, Reason.FORCED)
    if may_leave:
        reason = pressure(policy.triggers, load, healthy)
        if reason is not None:
            return Decision(Route.OVERFLOW, reason)
    return local_or_reject(load, healthy, room)


# -- circuit breaker --------------------------------------------------------------------------------------
class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed: requests go upstream; `failures` consecutive failures open it. Open: none go until
    `cooldown_s` has passed, then half-open: one probe goes; its success closes the circuit, its failure
    opens it for another cooldown. The clock is injectable (tests step it instead of sleeping)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive_failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False
        self._opens = asyncio.Event()  # set (and replaced) each time the circuit opens

    def opened_signal(self) -> asyncio.Event:
        """An event set when the circuit next opens: a request waiting on the upstream gives up then."""
        return self._opens

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def is_open(self) -> bool:
        """For the gauge: 1 until the circuit has closed again (half-open included)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a request go upstream now? In half-open, only the first caller (the probe) may; right after
        that call, state is HALF_OPEN only for the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self._probe_in_flight or self.consecutive_failures >= self.threshold:
            self._opened_at = self.clock()
            self._opens.set()
            self._opens = asyncio.Event()
        self._probe_in_flight = False

    def release(self) -> None:
        """A request allowed through ended with neither verdict (the client left first)."""
        self._probe_in_flight = False
