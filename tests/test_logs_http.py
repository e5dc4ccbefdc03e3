"""Structured logs and request tracing end to end.

Two real `glm-serve serve --log-format json` processes (the test engine double behind each): a local
one that overflows to the other. Every line either writes must be one JSON object; a client's
X-Request-Id comes back in the response header, in the local access line and in the upstream's
access line (so the upstream got it), with the client's traceparent's trace id on both; no API key
and no prompt text appear in any line. The OpenTelemetry spans are checked in process with the SDK's
in-memory exporter (tests/test_overflow_http.py's deployment: a local server and its upstream)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server import tracing
from server.logs import SECRETS, configure_logging, make_handler, valid_request_id
from tests.conftest import TEST_PROFILE, free_port, wait_until
from tests.serve_process import wait_healthy
from tests.test_overflow_http import (  # noqa: F401  (deploy and its fixtures)
    FORCER,
    LOCAL_MODEL,
    REMOTE_MODEL,
    SATURATED,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    USER,
    deploy,
    overflow_section,
)

REPO = Path(__file__).resolve().parent.parent
FAKE_ENGINE = "tests.fake_engine:FakeEngine"
PROMPT_MARKER = "Zebra-Quokka-Lantern-7731"  # prompt text that must never reach a log line
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
MESSAGES = [{"role": "user", "content": f"Tell me about {PROMPT_MARKER}."}]


@dataclass
class Process:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]


def serve(tmp_path: Path, name: str, profile: dict[str, Any], env: dict[str, str]) -> Process:
    port = free_port()
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(profile))
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--log-format", "json", "--engine-factory", FAKE_ENGINE]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    process = Process(proc, f"http://127.0.0.1:{port}", log_path)
    wait_healthy(proc, process.url, log_path, timeout=120)
    return process


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[Process, Process]]:
    tmp_path = tmp_path_factory.mktemp("json-logs")
    base = yaml.safe_load(TEST_PROFILE.read_text())
    upstream_profile = {**base, "server": {**base.get("server", {}), "served_model_name": REMOTE_MODEL,
                                           "api_keys": [UPSTREAM_KEY]}}  # fmt: skip
    upstream_profile["usage"] = {"path": str(tmp_path / "upstream.sqlite")}
    upstream = serve(tmp_path, "upstream", upstream_profile, {})
    local_profile = {**base, "server": {**base.get("server", {}), "served_model_name": LOCAL_MODEL,
                                        "api_keys": [USER], "force_overflow_keys": [FORCER]}}  # fmt: skip
    local_profile["usage"] = {"path": str(tmp_path / "local.sqlite")}
    local_profile["overflow"] = overflow_section(upstream.url)
    local = serve(tmp_path, "local", local_profile, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    yield local, upstream
    for process in (local, upstream):
        process.proc.send_signal(signal.SIGTERM)
        process.proc.wait(timeout=60)


def chat(local: Process, key: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    payload = {"model": LOCAL_MODEL, "messages": MESSAGES, "max_tokens": 4, **body}
    headers = {"Authorization": f"Bearer {key}", **headers}
    with httpx.Client(base_url=local.url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=payload, headers=headers)
        response.read()
    assert response.status_code == 200, response.text
    return response


def access_lines(process: Process, request_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in map(json.loads, process.lines())
        if line["logger"] == "glm_serve.access" and line.get("request_id") == request_id
    ]


def test_json_logs_carry_the_request_id_to_the_upstream_and_no_secret(pair):
    local, upstream = pair
    served = chat(local, USER, {"X-Request-Id": "client-req-0001"})
    assert served.headers["x-request-id"] == "client-req-0001" and served.headers["x-served-by"] == "local"
    forced = {"X-Request-Id": "client-req-0002", "X-Overflow": "force", "traceparent": TRACEPARENT}
    overflowed = chat(local, FORCER, forced)
    assert overflowed.headers["x-request-id"] == "client-req-0002"
    assert overflowed.headers["x-served-by"] == "holysheep"
    streamed = chat(local, FORCER, {**forced, "X-Request-Id": "client-req-0003"}, stream=True)
    assert streamed.headers["x-request-id"] == "client-req-0003" and "data: [DONE]" in streamed.text
    rejected_id = "not valid: has spaces"
    own = chat(local, USER, {"X-Request-Id": rejected_id}).headers["x-request-id"]
    assert own != rejected_id and valid_request_id(own)

    for process in (local, upstream):  # SIGTERM flushes nothing more: lines are written as they happen
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=60) == 0
    lines = {
        name: [json.loads(line) for line in p.lines()] for name, p in (("local", local), ("up", upstream))
    }
    for parsed in lines.values():  # every line is one JSON object with the common fields
        assert parsed and all({"time", "level", "logger"} <= set(line) for line in parsed)

    (line,) = access_lines(local, "client-req-0001")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert (line["model"], line["served_by"], line["completion_tokens"]) == (LOCAL_MODEL, "local", 4)
    assert line["prompt_tokens"] > 0 and line["ttft_s"] >= 0 and line["latency_s"] > 0
    for request_id in ("client-req-0002", "client-req-0003"):
        (mine,) = access_lines(local, request_id)
        (theirs,) = access_lines(upstream, request_id)  # the upstream saw the client's id
        assert (mine["served_by"], mine["upstream_model"], mine["model"]) == (
            "holysheep",
            REMOTE_MODEL,
            LOCAL_MODEL,
        )
        assert (theirs["served_by"], theirs["model"], theirs["status"]) == ("local", REMOTE_MODEL, 200)
        assert mine["trace_id"] == theirs["trace_id"] == TRACE_ID  # traceparent passed on (tracing off)
    assert access_lines(local, own) and not access_lines(local, rejected_id)

    everything = local.log_path.read_text() + upstream.log_path.read_text()
    for secret in (USER, FORCER, UPSTREAM_KEY, PROMPT_MARKER, "Tell me about"):
        assert secret not in everything, secret


def test_every_line_is_redacted_whatever_logged_it(caplog):
    stream = _Lines()
    handler = make_handler("json", stream)
    logger = logging.getLogger("glm_serve.test")
    logger.addHandler(handler)
    SECRETS.add(["sk-a-secret-key", "short"])  # keys shorter than 6 characters are not redacted
    try:
        logger.warning("upstream said: bad key sk-a-secret-key", exc_info=ValueError("sk-a-secret-key"))
    finally:
        logger.removeHandler(handler)
    (line,) = map(json.loads, stream.lines)
    assert "sk-a-secret-key" not in json.dumps(line) and "[redacted]" in line["message"]
    assert line["level"] == "WARNING" and "ValueError" in line["exception"]
    with pytest.raises(ValueError, match="log format"):
        make_handler("xml")


def test_request_ids_are_validated():
    assert valid_request_id("4f6c-AB_9.x:y/z=") == "4f6c-AB_9.x:y/z="
    for bad in ("", "a b", 'a"b', "a\r\nb", "x" * 129, "é"):
        assert valid_request_id(bad) is None
    assert valid_request_id("x" * 128)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines += [part for part in text.splitlines() if part]

    def flush(self) -> None:
        pass


# -- OpenTelemetry, in process ----------------------------------------------------------------------------
@pytest.fixture
def spans() -> Iterator[Any]:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)


def test_spans_for_admission_queue_prefill_decode_and_the_upstream_call(deploy, spans):  # noqa: F811
    d = deploy()
    local = d.chat(headers={"traceparent": TRACEPARENT}, max_tokens=3)
    assert local.status_code == 200 and local.headers["x-served-by"] == "local"
    d.local_engine.waiting = SATURATED
    far = d.chat(headers={"traceparent": TRACEPARENT, "X-Request-Id": "otel-over-1"}, max_tokens=3)
    d.local_engine.waiting = None
    assert far.status_code == 200 and far.headers["x-served-by"] == "holysheep"
    assert wait_until(
        lambda: sum(s.name == "POST /v1/chat/completions" for s in spans.get_finished_spans()) == 3
    )

    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}  # one trace, the client's
    by_id = {s.context.span_id: s for s in finished}
    servers = [s for s in finished if s.name == "POST /v1/chat/completions"]
    assert all(s.attributes["http.response.status_code"] == 200 for s in servers)
    roots = [s for s in servers if s.parent.span_id == int(TRACEPARENT.split("-")[2], 16)]
    assert len(roots) == 2  # the two requests to the local server
    (call,) = [s for s in finished if s.name == "upstream call"]
    (upstream_server,) = [s for s in servers if s.parent.span_id == call.context.span_id]
    phases = [s for s in finished if s.name in ("queue", "prefill", "decode")]
    assert sorted(s.name for s in phases) == ["decode", "decode", "prefill", "prefill", "queue", "queue"]
    for phase in phases:  # the local request's and the upstream's, each under its server span
        assert by_id[phase.parent.span_id].name == "POST /v1/chat/completions"
        assert phase.start_time <= phase.end_time
    admissions = [s for s in finished if s.name == "admission"]
    assert len(admissions) == 3 and all(by_id[s.parent.span_id] in servers for s in admissions)
    assert upstream_server.start_time >= call.start_time and upstream_server.end_time <= call.end_time


def test_tracing_is_on_only_with_an_otlp_endpoint():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    assert not tracing.setup_tracing({}) and not tracing.enabled()
    try:
        assert tracing.setup_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
        assert tracing.enabled()
    finally:
        tracing.use_provider(None)


def test_configure_logging_replaces_its_handler_and_follows_stderr(capsys):
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        configure_logging("info", "json")
        configure_logging("info", "json")  # a second call replaces the first handler
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1
        logging.getLogger("glm_serve.test").info("to stderr")  # capsys swapped sys.stderr after the call
        assert json.loads(capsys.readouterr().err.splitlines()[-1])["message"] == "to stderr"
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
