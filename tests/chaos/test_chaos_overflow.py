"""Overflow upstream faults: killed (connection refused), a black hole (accepts, never answers) and a stall
after the first byte. No request is lost, and no client waits on the upstream longer than the overflow
budget: the breaker opens for requests already waiting, the half-open probe is short, and a mid-stream
stall ends the stream with an error event within seconds. Fake upstreams are raw asyncio servers on
127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from server.app import create_app
from tests.conftest import ServerHandle, free_port, http_config, start_server
from tests.test_overflow_http import (
    LOCAL_MODEL,
    SATURATED,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    USER,
    Dial,
    overflow_section,
)

BUDGET_S, IDLE_S, PROBE_S = 2.0, 1.5, 0.5
MESSAGES = [{"role": "user", "content": "Say hello."}]


class FakeUpstream:
    """A loopback TCP server whose handler misbehaves in one way."""

    def __init__(self, loop_thread: Any, handler: Callable) -> None:
        self.loop_thread = loop_thread
        self.server = loop_thread.run(asyncio.start_server(handler, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.close()


async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


async def stall_after_first_byte(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    body = await reader.readexactly(length)
    if b'"stream": true' in body or b'"stream":true' in body:
        event = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"glm_5","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
    else:
        writer.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"id": "x", '
        )
    await writer.drain()
    try:
        await reader.read()  # stall until the client hangs up
    finally:
        writer.close()


@pytest.fixture()
def overflowing(loop_thread, engine, monkeypatch) -> Iterator[Callable[[str], ServerHandle]]:
    """overflowing(upstream_url) -> a saturated local glm-serve whose overflow goes to that URL."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    handles: list[ServerHandle] = []

    def make(url: str) -> ServerHandle:
        cfg = http_config(served_model_name=LOCAL_MODEL, api_keys=[USER])
        cfg.extra["overflow"] = overflow_section(
            url,
            upstream={"connect_timeout_s": 1.0, "first_byte_timeout_s": 5.0, "budget_s": BUDGET_S,
                      "idle_timeout_s": IDLE_S, "retries": 1, "retry_backoff_s": 0.05},
            circuit_breaker={"failures": 3, "cooldown_s": 1.0, "probe_timeout_s": PROBE_S},
        )  # fmt: skip
        dial = Dial(engine)
        dial.waiting = SATURATED
        handle = start_server(loop_thread, create_app(cfg, dial, manage_engine=False))
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


async def timed_chats(url: str, count: int, **fields: Any) -> list[tuple[int, str, float, str]]:
    body = {"model": LOCAL_MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}
    async with httpx.AsyncClient(
        base_url=url, timeout=120, headers={"Authorization": f"Bearer {USER}"}
    ) as http:

        async def one() -> tuple[int, str, float, str]:
            started = time.monotonic()
            response = await http.post("/v1/chat/completions", json=body)
            return (
                response.status_code,
                response.headers.get("x-served-by", ""),
                time.monotonic() - started,
                response.text,
            )

        return await asyncio.gather(*(one() for _ in range(count)))


def local_baseline(local: ServerHandle) -> float:
    overflow = local.serving.overflow
    saved, overflow.policy = (
        overflow.policy,
        type(overflow.policy)(),
    )  # overflow off: local service time alone
    try:
        return max(t for _, _, t, _ in asyncio.run(timed_chats(local.url, 10)))
    finally:
        overflow.policy = saved


def test_black_hole_upstream_costs_each_client_at_most_the_budget(loop_thread, overflowing, figures):
    upstream = FakeUpstream(loop_thread, black_hole)
    local = overflowing(upstream.url)
    try:
        baseline = local_baseline(local)
        first_wave = asyncio.run(timed_chats(local.url, 10))
        assert [(s, by) for s, by, _, _ in first_wave] == [(200, "local")] * 10  # none lost
        worst = max(t for _, _, t, _ in first_wave)
        assert worst <= BUDGET_S + baseline + 3.0, (worst, baseline)
        breaker = local.serving.overflow.breaker
        assert breaker.is_open()
        second_wave = asyncio.run(timed_chats(local.url, 5))  # the open circuit sends them local at once
        assert {s for s, _, _, _ in second_wave} == {200}
        time.sleep(1.1)  # cooldown: the next request is the half-open probe, with its short budget
        probe = asyncio.run(timed_chats(local.url, 1))[0]
        assert probe[0] == 200 and probe[1] == "local" and probe[2] <= PROBE_S + baseline + 3.0
        figures["overflow_black_hole"] = {
            "clients": 16, "budget_s": BUDGET_S, "local_only_max_s": round(baseline, 2),
            "max_latency_s": round(worst, 2), "probe_latency_s": round(probe[2], 2),
        }  # fmt: skip
    finally:
        upstream.close()


def test_killed_upstream_falls_back_at_once(overflowing, figures):
    port = free_port()  # nothing listens there: connection refused, like a killed upstream
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    local = overflowing(f"http://127.0.0.1:{port}")
    baseline = local_baseline(local)
    results = asyncio.run(timed_chats(local.url, 10))
    assert [(s, by) for s, by, _, _ in results] == [(200, "local")] * 10
    worst = max(t for _, _, t, _ in results)
    assert worst <= baseline + 3.0
    figures["overflow_killed"] = {
        "clients": 10,
        "local_only_max_s": round(baseline, 2),
        "max_latency_s": round(worst, 2),
    }


def test_upstream_stalling_after_the_first_byte_ends_each_answer_within_seconds(
    loop_thread, overflowing, figures
):
    upstream = FakeUpstream(loop_thread, stall_after_first_byte)
    local = overflowing(upstream.url)
    try:
        streams = asyncio.run(timed_chats(local.url, 4, stream=True))
        for status, served_by, took, text in streams:
            assert status == 200 and served_by == "holysheep"
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert '"Hel"' in events[0] and '"error"' in events[-2] and events[-1] == "[DONE]"
            assert took <= IDLE_S + 3.0
        fresh = overflowing(upstream.url)  # the four failed streams opened the first one's circuit
        whole = asyncio.run(timed_chats(fresh.url, 2))
        for status, _, took, text in whole:
            assert status == 502 and '"upstream_error"' in text and took <= IDLE_S + 3.0
        figures["overflow_stall_after_first_byte"] = {
            "clients": 6, "idle_timeout_s": IDLE_S, "max_latency_s": round(max(r[2] for r in streams + whole), 2),
        }  # fmt: skip
    finally:
        upstream.close()
