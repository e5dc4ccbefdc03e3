"""Real `python -m server.cli serve` processes for the tests that need a server of its own (SIGTERM,
kill -9, /health latency): the test engine (ENGINE_FACTORY) served as "drain-test", and streaming clients
in threads that record how their stream ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import ENGINE_FACTORY, TEST_PROFILE, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Write a long poem."}]


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_serve(tmp_path: Path, engine_factory: str = ENGINE_FACTORY, **env: str) -> ServeProcess:
    """A serve process on a free port with `env` added (GLM_SERVE_* settings), its ledger and log in
    tmp_path; returns once /health answers 200."""
    port = free_port()
    environ = {**os.environ, "GLM_SERVE_STATE_DIR": str(tmp_path), "GLM_SERVE_ENGINE__MAX_MODEL_LEN": "1024",
               "PYTHONPATH": str(REPO), **env}  # fmt: skip
    log_path = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(TEST_PROFILE), "--port", str(port),
           "--served-model-name", "drain-test", "--engine-factory", engine_factory]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT)
    server = ServeProcess(proc, port, log_path)
    wait_healthy(proc, server.url, log_path, timeout=600)
    return server


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Until /health answers 200; the log in the assertion if the process exits or the time runs out."""

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early ({proc.returncode}):\n{log_path.read_text()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(healthy, timeout=timeout, interval=0.1), log_path.read_text(errors="replace")


@dataclass
class StreamResult:
    started: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    saw_done: bool = False
    error_event: dict | None = None
    error: BaseException | None = None
    ended_at: float = 0.0  # time.monotonic() when the stream ended, however it ended


def stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, StreamResult]:
    result = StreamResult()
    body = {"model": "drain-test", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip

    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        result.saw_done = True
                        continue
                    chunk = json.loads(line[6:])
                    result.error_event = chunk.get("error") or result.error_event
                    if chunk.get("usage"):
                        result.completion_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        result.started.set()
                        result.finish_reason = choice.get("finish_reason") or result.finish_reason
        except BaseException as exc:  # recorded for the assertion in the test thread
            result.error = exc
        finally:
            result.ended_at = time.monotonic()
            result.started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result
