"""Overflow end to end: a second real glm-serve instance on another loopback port plays the HolySheep
upstream (it is OpenAI-compatible). The local instance is "saturated" deterministically by an engine
proxy that reports a waiting queue (no timing games); the upstream's proxy can fail or hang on demand.

The fixtures here are imported by tests/test_usage_http.py as well."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.engine_api import GenerateRequest, Load
from tests.conftest import EngineProxy, ServerHandle, http_config, metric_value, start_server

UPSTREAM_KEY_ENV = "GLM_SERVE_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-upstream-test"
USER, SOVEREIGN, FORCER, ADMIN = "sk-user", "sk-sovereign", "sk-forcer", "sk-admin"
LOCAL_MODEL, REMOTE_MODEL = "glm-5", "glm_5"
SATURATED = 10  # waiting requests: over the queue trigger (4), under server.max_queued_requests (256)
FULL = 300  # over server.max_queued_requests: nothing more queues locally
TEST_PRICES = {"glm-5": {"official": {"input": 1.0, "output": 4.0}}}  # test-only official price for glm-5
MESSAGES = [{"role": "user", "content": "Say hello."}]
BROKE = "the upstream broke (a test failure)"


class Dial(EngineProxy):
    """The shared engine with knobs: a reported waiting queue, health, and failures before the first
    delta (fail_after=0), after some (fail_after=n) or a hang before the first delta."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.waiting: int | None = None
        self.dead = False
        self.fail_after: int | None = None
        self.hang_s = 0.0

    def load(self) -> Load:
        real = self._inner.load()
        if self.waiting is None:
            return real
        return Load(real.num_running, self.waiting, real.kv_usage, real.est_wait_s, real.gen_tokens_per_s)

    def healthy(self) -> bool:
        return not self.dead and self._inner.healthy()

    async def generate(self, request: GenerateRequest) -> Any:
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        stream = self._inner.generate(request)
        produced = 0
        try:
            async for delta in stream:
                if self.fail_after is not None and produced >= self.fail_after:
                    raise RuntimeError(BROKE)
                produced += 1
                yield delta
        finally:
            await stream.aclose()


@dataclass
class Deployment:
    local: ServerHandle
    upstream: ServerHandle
    local_engine: Dial
    upstream_engine: Dial
    ledger: Path

    def post(self, path: str, body: dict, key: str = USER, **headers: str) -> httpx.Response:
        body = {"model": LOCAL_MODEL, **body}
        with httpx.Client(base_url=self.local.url, timeout=120) as http:
            return http.post(path, json=body, headers={"Authorization": f"Bearer {key}", **headers})

    def chat(self, key: str = USER, max_tokens: int = 3, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        return self.post(
            "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": max_tokens, **kwargs}, key, **headers
        )

    def metrics(self) -> str:
        return httpx.get(f"{self.local.url}/metrics", timeout=30).text

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels) or 0.0

    def upstream_requests(self) -> float:
        text = httpx.get(f"{self.upstream.url}/metrics", timeout=30).text
        return sum(
            metric_value(text, "glm_serve:http_requests_total", route=route, status=status) or 0.0
            for route in ("/v1/chat/completions", "/v1/completions")
            for status in ("200", "500", "499")
        )


def overflow_section(upstream_url: str, **changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "base_url": f"{upstream_url}/v1",
        "api_key_env": UPSTREAM_KEY_ENV,
        "models": {LOCAL_MODEL: REMOTE_MODEL},
        "triggers": {"queue_waiting": 4, "unhealthy": True},
        "upstream": {
            "connect_timeout_s": 2,
            "first_byte_timeout_s": 60,
            "idle_timeout_s": 60,
            "retries": 1,
            "retry_backoff_s": 0.05,
        },  # fmt: skip
        "circuit_breaker": {"failures": 3, "cooldown_s": 600},
    }
    for name, value in changes.items():
        section[name] = {**section[name], **value} if isinstance(value, dict) else value
    return section


@pytest.fixture(scope="module")
def deploy(loop_thread, engine, tmp_path_factory) -> Iterator[Callable[..., Deployment]]:
    """deploy(**overflow_changes) -> a local glm-serve overflowing to its own upstream glm-serve."""
    patch = pytest.MonkeyPatch()
    patch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    handles: list[ServerHandle] = []

    def start(cfg: Any, proxy: Dial) -> ServerHandle:
        handle = start_server(loop_thread, create_app(cfg, proxy, manage_engine=False))
        handles.append(handle)
        return handle

    def make(**changes: Any) -> Deployment:
        workdir = tmp_path_factory.mktemp("overflow")
        upstream_engine, local_engine = Dial(engine), Dial(engine)
        upstream_cfg = http_config(served_model_name=REMOTE_MODEL, api_keys=[UPSTREAM_KEY])
        upstream_cfg.extra["usage"] = {"path": str(workdir / "upstream.sqlite")}
        upstream = start(upstream_cfg, upstream_engine)
        cfg = http_config(
            served_model_name=LOCAL_MODEL, api_keys=[USER], sovereign_keys=[SOVEREIGN],
            force_overflow_keys=[FORCER], admin_keys=[ADMIN],
        )  # fmt: skip
        cfg.extra["overflow"] = overflow_section(upstream.url, **changes)
        ledger = workdir / "usage.sqlite"
        cfg.extra["usage"] = {"path": str(ledger), "gpu_hour_usd": 2.0, "prices": TEST_PRICES}
        return Deployment(start(cfg, local_engine), upstream, local_engine, upstream_engine, ledger)

    yield make
    for handle in handles:
        handle.stop()
    patch.undo()


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog) -> Iterator[None]:
    """Nothing fails silently behind a 200: no ERROR log but the upstream failures tests cause."""
    caplog.set_level(logging.WARNING)
    yield
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        caused = record.exc_info is not None and str(record.exc_info[1]) == BROKE
        assert record.levelno < logging.ERROR or caused, record.getMessage()


def served_by(response: Any) -> str:
    return response.headers.get("x-served-by", "")


# -- tests ----------------------------------------------------------------------------------------------
def test_saturated_requests_are_served_by_the_upstream_streamed_and_not(deploy):
    d = deploy()
    d.local_engine.waiting = SATURATED
    client = d.local.client(api_key=USER)
    raw = client.chat.completions.with_raw_response.create(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=4)
    assert served_by(raw) == "holysheep" and raw.headers["x-upstream-model"] == REMOTE_MODEL
    completion = raw.parse()
    assert completion.model == LOCAL_MODEL and completion.id == raw.headers["x-request-id"]
    assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"

    raw = client.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL,
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert served_by(raw) == "holysheep" and raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert {c.model for c in chunks} == {LOCAL_MODEL} and chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    raw = client.completions.with_raw_response.create(model=LOCAL_MODEL, prompt="Once upon", max_tokens=3)
    assert served_by(raw) == "holysheep" and raw.parse().usage.completion_tokens == 3
    raw = client.completions.with_raw_response.create(
        model=LOCAL_MODEL, prompt="Once upon", max_tokens=3, stream=True
    )
    chunks = list(raw.parse())
    assert served_by(raw) == "holysheep" and all(c.usage is None for c in chunks)  # not asked for: not sent
    assert {c.model for c in chunks} == {LOCAL_MODEL} and chunks[-1].choices[0].finish_reason == "length"

    assert d.metric("glm_serve:overflow_requests_total", reason="queue") == 4
    assert d.metric("glm_serve:overflow_circuit_open") == 0
    d.local_engine.waiting = None
    assert served_by(d.chat()) == "local"


def test_sovereign_keys_and_never_stay_local_under_the_same_load(deploy):
    d = deploy()
    d.local_engine.waiting = SATURATED
    before = d.upstream_requests()
    for response in (d.chat(key=SOVEREIGN), d.chat(headers={"X-Overflow": "never"}),
                     d.chat(key=SOVEREIGN, stream=True), d.chat(headers={"X-Overflow": "never"}, stream=True)):  # fmt: skip
        assert response.status_code == 200 and served_by(response) == "local"
    assert d.upstream_requests() == before  # nothing reached the upstream
    assert served_by(d.chat()) == "holysheep"

    d.local_engine.waiting = FULL  # no room locally: what may not leave gets 503, the rest leaves
    for response in (d.chat(key=SOVEREIGN), d.chat(headers={"X-Overflow": "never"})):
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
    assert served_by(d.chat()) == "holysheep"
    assert d.chat(headers={"X-Overflow": "maybe"}).status_code == 400


def test_force_is_for_marked_keys_and_an_unhealthy_engine_overflows(deploy):
    d = deploy()
    forced = d.chat(key=FORCER, headers={"X-Overflow": "force"})
    assert forced.status_code == 200 and served_by(forced) == "holysheep"
    denied = d.chat(headers={"X-Overflow": "force"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "overflow_force_denied"
    assert d.chat(key=SOVEREIGN, headers={"X-Overflow": "force"}).status_code == 403

    d.local_engine.dead = True
    assert served_by(d.chat()) == "holysheep"
    dead = d.chat(key=SOVEREIGN)
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
    assert d.metric("glm_serve:overflow_requests_total", reason="forced") == 1
    assert d.metric("glm_serve:overflow_requests_total", reason="unhealthy") == 1


def test_upstream_killed_mid_test_opens_the_circuit_and_local_serving_goes_on(deploy):
    d = deploy(circuit_breaker={"failures": 2})
    d.local_engine.waiting = SATURATED
    assert served_by(d.chat()) == "holysheep"
    d.upstream.stop()
    responses = [d.chat(stream=i % 2 == 1) for i in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert {served_by(r) for r in responses} == {"local"}
    # the breaker counts failed attempts as they happen: the first request's two attempts opened it
    assert d.metric("glm_serve:overflow_failures_total") == 1
    assert d.metric("glm_serve:overflow_circuit_open") == 1
    assert d.metric("glm_serve:overflow_fallbacks_total", cause="upstream_failed") == 1
    assert d.metric("glm_serve:overflow_fallbacks_total", cause="circuit_open") == 4

    d.local_engine.waiting = FULL  # circuit open and no local room: 503 with Retry-After, not a lost request
    full = d.chat()
    assert full.status_code == 503 and full.headers["retry-after"]
    assert "overflow upstream is unavailable" in full.json()["error"]["message"]


def test_an_upstream_failing_before_the_first_byte_leaves_the_request_local(deploy):
    d = deploy(circuit_breaker={"failures": 5})  # four failed attempts below: the circuit stays closed
    d.local_engine.waiting = SATURATED
    d.upstream_engine.fail_after = 0  # the upstream answers 500 before any output
    before = d.upstream_requests()
    for stream in (False, True):
        response = d.chat(stream=stream)
        assert response.status_code == 200 and served_by(response) == "local"
        assert (
            "data: [DONE]" in response.text if stream else response.json()["usage"]["completion_tokens"] == 3
        )
    assert d.upstream_requests() - before == 4  # each tried twice (one retry), before the first byte only
    assert d.metric("glm_serve:overflow_failures_total") == 2
    assert d.metric("glm_serve:overflow_circuit_open") == 0


def test_an_upstream_silent_past_the_first_byte_timeout_leaves_the_request_local(deploy):
    d = deploy(upstream={"first_byte_timeout_s": 0.5, "retries": 0})
    d.local_engine.waiting = SATURATED
    d.upstream_engine.hang_s = 30.0
    started = time.monotonic()
    response = d.chat()
    assert response.status_code == 200 and served_by(response) == "local"
    assert time.monotonic() - started < 20
    assert d.metric("glm_serve:overflow_failures_total") == 1


def test_a_failure_after_the_first_byte_reaches_the_client_as_an_openai_error(deploy):
    d = deploy()
    d.local_engine.waiting = SATURATED
    d.upstream_engine.fail_after = 1
    response = d.chat(stream=True, max_tokens=20)
    assert response.status_code == 200 and served_by(response) == "holysheep"
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2]


def test_half_open_probe_closes_the_circuit(deploy):
    d = deploy(circuit_breaker={"failures": 1, "cooldown_s": 60})
    now = [1000.0]
    d.local.serving.overflow.breaker.clock = lambda: now[0]
    d.local_engine.waiting = SATURATED
    d.upstream_engine.fail_after = 0
    assert served_by(d.chat()) == "local"
    assert d.metric("glm_serve:overflow_circuit_open") == 1
    d.upstream_engine.fail_after = None  # the upstream recovers; the circuit stays open until the cooldown
    assert served_by(d.chat()) == "local"
    now[0] += 60
    assert served_by(d.chat()) == "holysheep"  # the half-open probe
    assert d.metric("glm_serve:overflow_circuit_open") == 0
    assert served_by(d.chat()) == "holysheep"
