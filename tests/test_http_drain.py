"""SIGTERM on a real `python -m server.cli serve` process: it stops admitting (503, /health 503), lets
in-flight streams finish (or cuts them at the drain timeout), and exits 0. Also the CLI's flags."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.app import served_model_name
from server.cli import main, parse_args
from server.cli_flags import config_from_args
from server.config import load_config
from tests.conftest import TEST_PROFILE, free_port, wait_until
from tests.serve_process import MESSAGES, ServeProcess, start_serve, stream_in_thread


def start_drain_test(tmp_path: Path, drain_timeout_s: float, token_delay_s: float = 0.01) -> ServeProcess:
    return start_serve(
        tmp_path,
        GLM_SERVE_SERVER__DRAIN_TIMEOUT_S=str(drain_timeout_s),
        GLM_FAKE_TOKEN_DELAY_S=str(token_delay_s),
    )


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    server = start_drain_test(tmp_path, drain_timeout_s=60)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "drain-test"
    max_tokens = 120
    streams = [stream_in_thread(server.url, max_tokens) for _ in range(3)]
    for _, result in streams:
        assert result.started.wait(120) and result.error is None
    server.proc.send_signal(signal.SIGTERM)

    with httpx.Client(base_url=server.url, timeout=10) as http:

        def refused() -> bool:
            response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
            return response.status_code == 503 and response.json()["error"]["code"] == "server_draining"

        assert wait_until(refused, timeout=5), server.log()
        assert http.get("/health").status_code == 503
    for thread, result in streams:
        thread.join(120)
        assert result.error is None, result.error
        assert result.finish_reason == "length" and result.completion_tokens == max_tokens and result.saw_done
    assert server.proc.wait(60) == 0, server.log()
    assert "draining" in server.log()


def test_sigterm_drain_timeout_cuts_long_requests(tmp_path):
    server = start_drain_test(tmp_path, drain_timeout_s=0.5, token_delay_s=0.02)
    thread, result = stream_in_thread(server.url, max_tokens=900)
    assert result.started.wait(120)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()
    assert time.monotonic() - started < 15
    thread.join(30)
    assert result.finish_reason is None  # cut before the end, cleanly: an error event, then [DONE]
    assert result.error_event["code"] == "request_aborted" and result.saw_done


def test_second_signal_stops_at_once(tmp_path):
    server = start_drain_test(tmp_path, drain_timeout_s=60, token_delay_s=0.02)
    thread, result = stream_in_thread(server.url, max_tokens=900)
    assert result.started.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()
    thread.join(30)


def test_cli_flags_override_the_profile(tmp_path):
    args, extra = parse_args(
        ["serve", "--model", "/models/GLM-4.5-Air", "--host", "0.0.0.0", "--port", "9001",
         "--served-model-name", "glm"]
    )  # fmt: skip
    assert args.config == str(TEST_PROFILE)
    cfg = config_from_args(args, extra)
    assert (cfg.engine.model, cfg.server.host, cfg.server.port) == ("/models/GLM-4.5-Air", "0.0.0.0", 9001)
    cfg.server.served_model_name = None

    class Named:
        model_name = "engine-name"

    assert served_model_name(cfg, Named()) == "GLM-4.5-Air"  # the model directory's name
    cfg.server.served_model_name = "glm"
    assert served_model_name(cfg, Named()) == "glm"
    default = load_config(TEST_PROFILE)
    assert served_model_name(default, Named()) == "engine-name"  # the embedded default: the engine's name


def test_engine_that_cannot_be_built_exits_nonzero(caplog):
    argv = ["serve", "--port", str(free_port()), "--engine-factory", "tests.fake_engine:NoSuchEngine"]
    assert main(argv) == 1
    assert "the engine failed to start" in caplog.text


def test_missing_api_key_file_fails_fast(tmp_path, capsys):
    assert main(["serve", "--api-key-file", str(tmp_path / "nope.txt")]) == 2
    assert "api_key_file" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).with_name("glm-serve")
    if not script.exists():
        pytest.skip("glm-serve console script not installed in this environment")
    result = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--served-model-name" in result.stdout
