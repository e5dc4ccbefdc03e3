"""Overflow policy without a server: the `overflow:` section, the admission decision for every kind of
caller and load, and the circuit breaker's states on a stepped clock."""

from __future__ import annotations

import pytest

from server.api_keys import ANONYMOUS_KEY, ApiKey
from server.config import ConfigError, ServerConfig, collect_api_keys, load_config
from server.engine_api import Load
from server.errors import APIError
from server.overflow import (
    BreakerState,
    CircuitBreaker,
    QueueRoom,
    Reason,
    Route,
    Triggers,
    decide,
    parse_overflow_config,
    pressure,
)

USER = ApiKey("user")
SOVEREIGN = ApiKey("sov", sovereign=True)
FORCER = ApiKey("forcer", force_overflow=True)
LIMIT = QueueRoom(sequences=1, tokens=10, max_sequences=256, max_tokens=262144)  # a one-prompt request
POLICY = parse_overflow_config(
    {
        "enabled": True,
        "models": {"glm-5": "glm_5"},
        "triggers": {"queue_waiting": 8, "est_wait_s": 10, "kv_usage": 0.9, "unhealthy": True},
    }
)


def load(waiting: int = 0, kv: float = 0.1, wait_s: float = 0.0) -> Load:
    return Load(num_running=4, num_waiting=waiting, kv_usage=kv, est_wait_s=wait_s, gen_tokens_per_s=100.0)


def route(decision) -> tuple[Route, Reason | None]:
    return decision.route, decision.reason


# -- configuration ------------------------------------------------------------------------------------------
def test_off_by_default_and_in_every_profile():
    assert parse_overflow_config(None).enabled is False
    cfg = load_config("cpu")
    assert parse_overflow_config(cfg.extra["overflow"]).enabled is False


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ({"enabeld": True}, "overflow.enabeld"),
        ({"triggers": {"queue": 3}}, "overflow.triggers.queue"),
        ({"upstream": {"timeout": 3}}, "overflow.upstream.timeout"),
        ({"circuit_breaker": {"cool": 1}}, "overflow.circuit_breaker.cool"),
        ({"triggers": {"kv_usage": 1.5}}, "overflow.triggers.kv_usage"),
        ({"triggers": {"queue_waiting": 0}}, "overflow.triggers.queue_waiting"),
        ({"upstream": {"first_byte_timeout_s": 0}}, "overflow.upstream.first_byte_timeout_s"),
        ({"circuit_breaker": {"failures": 0}}, "overflow.circuit_breaker.failures"),
        ({"models": {"glm-5": 5}}, "overflow.models"),
        ({"base_url": "api.holysheep.ai"}, "overflow.base_url"),
    ],
)
def test_bad_sections_are_errors_naming_the_key(section, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_overflow_config(section)


def test_key_roles_from_lists_and_key_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# keys\nsk-plain\nsk-sov sovereign\nsk-ops admin force_overflow\n")
    keys = collect_api_keys(ServerConfig(api_keys=["sk-a"], admin_keys=["sk-b"], api_key_file=str(key_file)))
    assert set(keys) == {"sk-a", "sk-b", "sk-plain", "sk-sov", "sk-ops"}
    assert keys["sk-sov"].sovereign and not keys["sk-sov"].force_overflow
    assert keys["sk-ops"].admin and keys["sk-ops"].force_overflow and keys["sk-b"].admin
    assert "sk-" not in "".join(k.key_id for k in keys.values())  # only hashes leave this function
    assert len({k.key_id for k in keys.values()}) == 5
    key_file.write_text("sk-x superuser\n")
    with pytest.raises(ConfigError, match="superuser"):
        collect_api_keys(ServerConfig(api_key_file=str(key_file)))
    with pytest.raises(ConfigError, match="both sovereign and force_overflow"):
        collect_api_keys(ServerConfig(sovereign_keys=["k"], force_overflow_keys=["k"]))


# -- the decision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "healthy", "expected"),
    [
        ({}, True, None),
        ({"waiting": 7}, True, None),
        ({"waiting": 8}, True, Reason.QUEUE),
        ({"wait_s": 10.0}, True, None),
        ({"wait_s": 10.5}, True, Reason.WAIT),
        ({"kv": 0.95}, True, Reason.KV),
        ({}, False, Reason.UNHEALTHY),
    ],
)
def test_each_trigger(kwargs, healthy, expected):
    assert pressure(POLICY.triggers, load(**kwargs), healthy) == expected
    assert pressure(Triggers(unhealthy=False), load(waiting=1000, kv=1.0, wait_s=1e6), False) is None


def test_an_unloaded_server_serves_locally():
    for key in (USER, SOVEREIGN, FORCER, ANONYMOUS_KEY):
        assert route(decide(POLICY, load(), True, key, None, "glm-5", LIMIT)) == (Route.LOCAL, None)


def test_a_saturated_server_overflows_what_may_leave():
    saturated = load(waiting=20)
    assert route(decide(POLICY, saturated, True, USER, None, "glm-5", LIMIT)) == (
        Route.OVERFLOW,
        Reason.QUEUE,
    )
    assert route(decide(POLICY, saturated, True, USER, "auto", "glm-5", LIMIT))[0] is Route.OVERFLOW
    # what may not leave queues locally...
    assert route(decide(POLICY, saturated, True, SOVEREIGN, None, "glm-5", LIMIT))[0] is Route.LOCAL
    assert route(decide(POLICY, saturated, True, USER, "never", "glm-5", LIMIT))[0] is Route.LOCAL
    assert route(decide(POLICY, saturated, True, USER, " Never ", "glm-5", LIMIT))[0] is Route.LOCAL
    assert route(decide(POLICY, saturated, True, USER, None, "unmapped-model", LIMIT))[0] is Route.LOCAL
    disabled = parse_overflow_config({"models": {"glm-5": "glm_5"}, "triggers": {"queue_waiting": 1}})
    assert route(decide(disabled, saturated, True, USER, None, "glm-5", LIMIT))[0] is Route.LOCAL


def test_what_cannot_leave_gets_503_when_the_local_queue_is_full_or_the_engine_dead():
    full = load(waiting=LIMIT.max_sequences)
    for key, header in ((SOVEREIGN, None), (USER, "never"), (SOVEREIGN, "auto")):
        decision = decide(POLICY, full, True, key, header, "glm-5", LIMIT)
        assert decision.route is Route.REJECT and decision.error.status == 503
        assert decision.error.code == "queue_full" and decision.error.headers["Retry-After"]
        dead = decide(POLICY, load(), False, key, header, "glm-5", LIMIT)
        assert dead.route is Route.REJECT and dead.error.code == "engine_dead"
    # a key that may leave goes out instead of getting the 503
    assert route(decide(POLICY, full, True, USER, None, "glm-5", LIMIT)) == (Route.OVERFLOW, Reason.QUEUE)
    assert route(decide(POLICY, load(), False, USER, None, "glm-5", LIMIT)) == (
        Route.OVERFLOW,
        Reason.UNHEALTHY,
    )


def test_force_is_for_marked_keys_only():
    assert route(decide(POLICY, load(), True, FORCER, "force", "glm-5", LIMIT)) == (
        Route.OVERFLOW,
        Reason.FORCED,
    )
    for key in (USER, SOVEREIGN, ANONYMOUS_KEY):
        denied = decide(POLICY, load(), True, key, "force", "glm-5", LIMIT)
        assert denied.route is Route.REJECT and denied.error.status == 403
    off = decide(parse_overflow_config(None), load(), True, FORCER, "force", "glm-5", LIMIT)
    assert off.error.status == 400 and off.error.code == "overflow_disabled"


def test_an_unknown_header_value_is_400():
    with pytest.raises(APIError) as caught:
        decide(POLICY, load(), True, USER, "sometimes", "glm-5", LIMIT)
    assert caught.value.status == 400 and "X-Overflow" in caught.value.message


# -- circuit breaker -----------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_k_consecutive_failures():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # the count is of consecutive failures
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.is_open()
    assert not breaker.allow()
    clock.now += 29.9
    assert not breaker.allow()


def test_breaker_half_opens_for_one_probe():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=30, clock=clock)
    breaker.record_failure()
    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN and breaker.is_open()
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # nobody else while it runs
    breaker.record_failure()  # the probe failed: another full cooldown
    assert breaker.state is BreakerState.OPEN
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()
    breaker.release()  # the probe's client left: the next caller probes
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and not breaker.is_open()
    assert breaker.allow() and breaker.allow()


def test_closing_resets_the_failure_count():
    clock = Clock()
    breaker = CircuitBreaker(failures=5, cooldown_s=10, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()  # one failure after closing does not reopen
    assert breaker.state is BreakerState.CLOSED
