"""Process-level faults on real `python -m server.cli serve` processes (clients in this process, so the
server's event loop shares its interpreter with nobody): /health latency, probed from a process of its
own, while large bodies are tokenized; SIGTERM with streams in flight and half-sent bodies open (the
drain waits for the streams only; one ledger row per stream; the half-sent bodies cost bounded memory);
kill -9 under load (the ledger passes SQLite's integrity check and holds a row for every request
answered before the kill)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.chaos.test_chaos_load import half_send
from tests.conftest import wait_until
from tests.serve_process import REPO, ServeProcess, start_serve, stream_in_thread

PENDING_CAP = 32 * 1024 * 1024
DRAIN_S = 120  # the drain timeout: far longer than the streams, so waiting for the bodies would show


def ledger(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "usage.sqlite")


class HealthPoller:
    """/health every 20 ms from a process of its own (tests/chaos/health_poller.py): this test's load
    generator shares an interpreter with nothing that is measured."""

    def __init__(self, port: int) -> None:
        command = [sys.executable, "-m", "tests.chaos.health_poller", str(port)]
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(self) -> list[float]:
        """The latencies measured, sorted (the poller failing, e.g. a /health that is not 200, fails here)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the /health poller stopped: {self.proc.communicate()[1].decode()}")
        self.proc.terminate()
        out, _ = self.proc.communicate(30)
        return sorted(float(line) for line in out.split())


def percentile(latencies: list[float], fraction: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * fraction))]


def health_latencies_under_tokenization(server: ServeProcess) -> tuple[list[float], list[int]]:
    """/health while 8 chat bodies of ~1 MB (~160k tokens each: refused after tokenizing, over the
    per-request token limit) and 100 /tokenize calls of ~96 KiB arrive at once."""
    messages = [{"role": "user", "content": "hello world " * 80_000}]
    big_chat = json.dumps({"model": "drain-test", "messages": messages, "max_tokens": 1})
    tokenize_body = json.dumps({"model": "drain-test", "prompt": "lorem ipsum " * 8_000})

    async def load() -> list[int]:
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=headers) as http:
            posts = [http.post("/v1/chat/completions", content=big_chat) for _ in range(8)]
            posts += [http.post("/tokenize", content=tokenize_body) for _ in range(100)]
            return [r.status_code for r in await asyncio.gather(*posts)]

    poller = HealthPoller(server.port)
    time.sleep(0.5)
    statuses = asyncio.run(load())
    time.sleep(0.2)
    return poller.stop(), statuses


def idle_health_latencies(server: ServeProcess, seconds: float) -> list[float]:
    """/health on the idle server: the host's own latency, the floor under the figure with load."""
    poller = HealthPoller(server.port)
    time.sleep(seconds)
    return poller.stop()


def test_health_under_tokenization_then_sigterm_with_streams_and_half_sent_bodies(tmp_path, figures):
    server = start_serve(tmp_path, GLM_SERVE_SERVER__MAX_PENDING_BODY_BYTES=str(PENDING_CAP),
                   GLM_SERVE_SERVER__BODY_READ_TIMEOUT_S="120", GLM_SERVE_SERVER__DRAIN_TIMEOUT_S=str(DRAIN_S))  # fmt: skip
    # headers past max_header_bytes (h11 counts what arrives before the blank line ends them)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
        assert sock.recv(64).startswith((b"HTTP/1.1 400", b"HTTP/1.1 431"))
    idle = idle_health_latencies(server, seconds=4.0)
    latencies, statuses = health_latencies_under_tokenization(server)
    p99, idle_p99 = percentile(latencies, 0.99), percentile(idle, 0.99)
    figures["health_under_tokenization"] = {
        "health_probes": len(latencies), "max_s": round(latencies[-1], 3), "p99_s": round(p99, 3),
        "median_s": round(percentile(latencies, 0.5), 3),
        "idle_p99_s": round(idle_p99, 3), "idle_max_s": round(idle[-1], 3),
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
    }  # fmt: skip
    # chat bodies over the per-request token limit are 400 after tokenizing; requests past the pool's
    # queue cap are told to retry (503 + Retry-After); nothing else
    assert set(statuses) <= {200, 400, 503} and statuses.count(200) >= 50, statuses
    # the aim, /health within 100 ms under any load, at p99 (the max is recorded: one probe can
    # wait for a core on a shared host). Over the idle server's own p99 on the same host: a few ms on a
    # quiet host, more where other processes hold the cores, which no server can answer for.
    assert p99 < 0.1 + idle_p99, figures["health_under_tokenization"]

    process = psutil.Process(server.proc.pid)
    before = process.memory_info().rss
    sockets = [half_send(server.port, 4 * 1024 * 1024 - 1, 2 * 1024 * 1024) for _ in range(60)]  # 120 MiB
    time.sleep(1.0)
    grown = process.memory_info().rss - before
    streams = [stream_in_thread(server.url, max_tokens=48) for _ in range(8)]
    for _, result in streams:
        assert result.started.wait(120)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(DRAIN_S + 30) == 0, server.log()
    exited = time.monotonic()
    took = exited - started
    for thread, result in streams:
        thread.join(30)
        assert result.error is None and result.saw_done and result.finish_reason == "length", result
    after_streams = exited - max(result.ended_at for _, result in streams)
    for sock in sockets:
        sock.close()
    with ledger(tmp_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        served = db.execute("SELECT COUNT(*) FROM usage WHERE status = 200").fetchone()[0]
    figures["sigterm"] = {
        "streams": len(streams), "ledger_rows_200": served, "exit_s": round(took, 2),
        "exit_after_last_stream_s": round(after_streams, 2),
        "half_sent_connections": len(sockets), "half_sent_mib": 120, "pending_cap_mib": PENDING_CAP >> 20,
        "rss_growth_mib": round(grown / 2**20, 1),
    }  # fmt: skip
    assert served == len(streams)
    # the drain waited for the streams only (they all ended with "length"), not for the half-sent bodies,
    # which would have held it to the drain timeout
    assert took < DRAIN_S, figures["sigterm"]
    assert grown < PENDING_CAP + 64 * 1024 * 1024, figures["sigterm"]


def test_kill_9_under_load_leaves_an_intact_ledger_with_every_answered_request(tmp_path, figures):
    server = start_serve(tmp_path)
    answered: list[tuple[str, float]] = []
    stop = threading.Event()
    body = {
        "model": "drain-test",
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 8,
    }

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    answered.append((response.headers["x-request-id"], time.monotonic()))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(answered) >= 20, timeout=120)
    killed_at = time.monotonic()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    stop.set()
    for thread in threads:
        thread.join(30)
    with ledger(tmp_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0] for r in db.execute("SELECT request_id FROM usage")}
    settled = [
        rid for rid, at in answered if at < killed_at - 1.0
    ]  # a row is committed just after its answer
    missing = [rid for rid in settled if rid not in rows]
    figures["kill_9"] = {
        "answered": len(answered),
        "rows": len(rows),
        "answered_1s_before_kill_missing": len(missing),
    }
    assert settled and not missing


def test_connections_past_the_cap_get_503_with_retry_after(tmp_path):
    """uvicorn's own cap (limit_concurrency) answers a bare 503; the guard's counts uvicorn's connections
    and answers with Retry-After. Idle connections count: they have sent nothing yet."""
    server = start_serve(
        tmp_path, engine_factory="tests.fake_engine:FakeEngine", GLM_SERVE_SERVER__MAX_CONNECTIONS="4"
    )
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            refused = http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert refused.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert wait_until(lambda: http.get("/v1/models").status_code == 200, timeout=10)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()
