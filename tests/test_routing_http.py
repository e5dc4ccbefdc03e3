"""Routing end to end: two real glm-serve servers play the primary ("a") and the candidate ("b"), a third
serves in front with routing on; a listening socket that never answers plays a black-hole candidate
("hole"). All share the session's engine (tests/conftest.py); the candidate's engine proxy can fail or
hang on demand (tests/test_overflow_http.py: Dial)."""

from __future__ import annotations

import json
import math
import re
import socket
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api_keys import api_key_id
from server.app import create_app
from server.routing import bucket
from server.routing_report import build_report
from server.routing_report import main as routing_main
from server.usage import UsageConfig
from server.usage_report import build_report as usage_report
from tests.conftest import ServerHandle, http_config, metric_value, start_server, wait_until
from tests.test_overflow_anthropic import TEXT, fake_anthropic  # noqa: F401  (a fixture)
from tests.test_overflow_http import Dial

MODEL = "glm-5"
UPSTREAM_KEY_ENV, UPSTREAM_KEY = "GLM_SERVE_TEST_ROUTING_KEY", "sk-routing-upstream"
USER, SOVEREIGN, ADMIN = "sk-user", "sk-sovereign", "sk-admin"
CANARY_KEYS = [f"sk-canary-{i:02d}" for i in range(20)]
MESSAGES = [{"role": "user", "content": "Name three colours."}]
IDS = re.compile(rb'"(id|item_id|created|created_at)":\s*("[^"]*"|\d+)')


@dataclass
class Front:
    handle: ServerHandle
    store: Path
    cfg: Any
    ledger: Path

    def post(self, path: str, body: dict, key: str = USER, **headers: str) -> httpx.Response:
        with httpx.Client(base_url=self.handle.url, timeout=120) as http:
            return http.post(
                path, json={"model": MODEL, **body}, headers={"Authorization": f"Bearer {key}", **headers}
            )

    def chat(self, key: str = USER, **body: Any) -> httpx.Response:
        return self.post(
            "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0, **body}, key
        )

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(httpx.get(f"{self.handle.url}/metrics", timeout=30).text, name, **labels) or 0.0

    def rows(self) -> list[dict]:
        with sqlite3.connect(self.store) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM comparisons ORDER BY id")]

    def admin(self, key: str = ADMIN, **body: Any) -> httpx.Response:
        with httpx.Client(base_url=self.handle.url, timeout=30) as http:
            return http.post("/admin/routing", json=body, headers={"Authorization": f"Bearer {key}"})


def served_requests(handle: ServerHandle) -> float:
    text = httpx.get(f"{handle.url}/metrics", timeout=30).text
    return sum(
        metric_value(text, "glm_serve:http_requests_total", route=route, status=status) or 0.0
        for route in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
        for status in ("200", "500", "499")
    )


@pytest.fixture(scope="module")
def black_hole() -> Iterator[str]:
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


@pytest.fixture(scope="module")
def upstreams(loop_thread, engine) -> Iterator[dict[str, Any]]:
    patch = pytest.MonkeyPatch()
    patch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    made = {}
    for name in ("a", "b"):
        dial = Dial(engine)
        cfg = http_config(served_model_name=MODEL, api_keys=[UPSTREAM_KEY])
        made[name] = start_server(loop_thread, create_app(cfg, dial, manage_engine=False))
        made[f"{name}_engine"] = dial
    yield made
    for name in ("a", "b"):
        made[name].stop()
    patch.undo()


@pytest.fixture()
def front(loop_thread, engine, upstreams, black_hole, tmp_path) -> Iterator[Callable[..., Front]]:
    """front(restart_of=None, guards=..., **route) -> the routing server in front of a and b."""
    started: list[ServerHandle] = []

    def target(url: str, **timeouts: float) -> dict[str, Any]:
        return {"base_url": url, "api_key_env": UPSTREAM_KEY_ENV, "first_byte_timeout_s": 30, **timeouts}

    def make(restart_of: Front | None = None, guards: dict | None = None, max_in_flight: int = 16,
             hole_first_byte_s: float = 0.3, anthropic_url: str | None = None, **route: Any) -> Front:  # fmt: skip
        if restart_of is not None:
            restart_of.handle.stop()
            cfg = restart_of.cfg
        else:
            cfg = http_config(
                served_model_name=MODEL,
                api_keys=[USER, *CANARY_KEYS],
                sovereign_keys=[SOVEREIGN],
                admin_keys=[ADMIN],
            )
            cfg.extra["usage"] = {"path": str(tmp_path / "usage.sqlite")}
            cfg.extra["agent_apis"] = {"responses_path": str(tmp_path / "responses.sqlite")}
            cfg.extra["routing"] = {
                "enabled": True,
                "shadow_max_in_flight": max_in_flight,
                "targets": {
                    "a": target(f"{upstreams['a'].url}/v1"),
                    "b": target(f"{upstreams['b'].url}/v1"),
                    "hole": target(black_hole, first_byte_timeout_s=hole_first_byte_s, connect_timeout_s=0.5),
                    # speaks Anthropic's Messages API only (tests/test_overflow_anthropic.py: FakeAnthropic)
                    "claude": target(black_hole, anthropic_base_url=anthropic_url or black_hole),
                },
                "models": {MODEL: {"primary": "a", "candidate": "b", **route}},
                "guards": guards or {},
            }
        handle = start_server(loop_thread, create_app(cfg, Dial(engine), manage_engine=False))
        started.append(handle)
        return Front(handle, tmp_path / "usage.sqlite", cfg, tmp_path / "usage.sqlite")

    yield make
    for handle in started:
        if not handle.server.should_exit:
            handle.stop()
    for name in ("a_engine", "b_engine"):
        upstreams[name].fail_after, upstreams[name].hang_s = None, 0.0


def normalized(raw: bytes) -> bytes:
    return IDS.sub(rb'"\1":0', raw)


BODIES = [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "stream": True}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, "stream": True,
                         "stream_options": {"include_usage": True}}),
]  # fmt: skip


# -- tests ----------------------------------------------------------------------------------------------
def test_shadow_keeps_the_primary_bytes_and_compares_every_request(front, upstreams):
    f = front(mode="shadow", weight=0)
    before_b = served_requests(upstreams["b"])
    for _ in range(2):  # the second round finds the prompts in the prefix cache, as the shadowed round will
        unshadowed = [normalized(f.post(path, {**body, "temperature": 0}).content) for path, body in BODIES]
    assert served_requests(upstreams["b"]) == before_b and f.rows() == []  # weight 0: nothing mirrored
    assert f.admin(model=MODEL, weight=100).status_code == 200
    for i, (path, body) in enumerate(BODIES):
        response = f.post(path, {**body, "temperature": 0})
        assert response.status_code == 200 and response.headers["x-served-by"] == "a"
        assert normalized(response.content) == unshadowed[i]  # byte for byte, ids and times aside
        assert wait_until(lambda n=i + 1: len(f.rows()) == n, timeout=60)  # one comparison row each
    direct = httpx.post(f"{upstreams['a'].url}/v1/completions", json={"model": MODEL, **BODIES[2][1], "temperature": 0},
                        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=60)  # fmt: skip
    assert json.loads(normalized(direct.content)) == json.loads(unshadowed[2])  # what a says, unrouted
    rows = f.rows()
    assert {r["kind"] for r in rows} == {"shadow"} and served_requests(upstreams["b"]) == before_b + len(
        BODIES
    )
    for row in rows:
        assert (row["primary_status"], row["candidate_status"], row["candidate_error"]) == (200, 200, None)
        assert row["similarity"] == 1.0 and row["primary_tokens"] == row["candidate_tokens"] == 6
        assert row["key_id"] == api_key_id(USER) and row["primary_text"] is None  # no text unless store_text
        assert row["primary_ttft_s"] is not None and row["candidate_latency_s"] > 0
    assert f.metric("glm_serve:shadow_requests_total", result="ok") == len(BODIES)

    seen = served_requests(upstreams["a"]), served_requests(upstreams["b"])
    for response in (f.chat(SOVEREIGN), f.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2},
                                               **{"X-Overflow": "never"})):  # fmt: skip
        assert response.status_code == 200 and response.headers["x-served-by"] == "local"
    assert (served_requests(upstreams["a"]), served_requests(upstreams["b"])) == seen  # nothing left the host
    assert len(f.rows()) == len(BODIES)

    report = build_report(f.store, UsageConfig())
    shadow = report["pairs"][0]["shadow"]
    assert (report["pairs"][0]["primary"], report["pairs"][0]["candidate"]) == ("a", "b")
    assert shadow["requests"] == len(BODIES) and shadow["similarity_mean"] == 1.0
    assert shadow["candidate_errors"] == 0 and shadow["latency_s"]["p95_ratio"] is not None


AGENT_BODIES = [
    ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 6, "messages": MESSAGES}),
    ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 6, "messages": MESSAGES, "stream": True}),
    ("/v1/responses", {"input": "Name three colours.", "max_output_tokens": 6}),
    ("/v1/responses", {"input": "Name three colours.", "max_output_tokens": 6, "stream": True}),
]


def test_messages_and_responses_are_shadowed_and_canaried_through_their_translation(front, upstreams):
    """The upstream targets speak chat completions: the route translates each request for them and their
    answers back, shadowing leaves the client's bytes as they were, and each request leaves one row."""
    f = front(mode="shadow", weight=0)
    for _ in range(2):  # the second round finds the prompts in the prefix cache, as the shadowed round will
        unshadowed = [
            normalized(f.post(path, {**body, "temperature": 0}).content) for path, body in AGENT_BODIES
        ]
    assert f.admin(model=MODEL, weight=100).status_code == 200
    for i, (path, body) in enumerate(AGENT_BODIES):
        response = f.post(path, {**body, "temperature": 0})
        assert response.status_code == 200 and response.headers["x-served-by"] == "a"
        assert normalized(response.content) == unshadowed[i]  # byte for byte, ids and times aside
        assert wait_until(lambda n=i + 1: len(f.rows()) == n, timeout=60)
    for row, (path, _) in zip(f.rows(), AGENT_BODIES, strict=True):
        assert (row["endpoint"], row["primary_status"], row["candidate_status"]) == (path, 200, 200)
        assert row["candidate_error"] is None and row["similarity"] == 1.0
        assert row["primary_tokens"] == row["candidate_tokens"] == 6 and row["primary_finish"] == "length"
    with sqlite3.connect(f.store.parent / "responses.sqlite") as db:  # the shadows stored nothing
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 2 * 2 + 2

    seen = served_requests(upstreams["a"]), served_requests(upstreams["b"])
    sovereign = f.post(*AGENT_BODIES[0], key=SOVEREIGN)
    assert sovereign.status_code == 200 and sovereign.headers["x-served-by"] == "local"
    assert (served_requests(upstreams["a"]), served_requests(upstreams["b"])) == seen

    f = front(mode="canary", weight=100, candidate="hole")  # the candidate never answers: a serves
    for path, body in AGENT_BODIES:
        response = f.post(path, body)
        assert response.status_code == 200 and response.headers["x-served-by"] == "a"
    assert {r["candidate_error"] is not None for r in f.rows() if r["served"] == "candidate"} == {True}


def test_messages_go_to_a_target_that_speaks_them_in_their_own_api(front, fake_anthropic):  # noqa: F811
    fake, upstream = fake_anthropic
    path, body = AGENT_BODIES[0]
    f = front(mode="canary", weight=100, candidate="claude", anthropic_url=upstream.url)
    for stream in (False, True):
        response = f.post(path, {**body, "stream": stream})
        assert response.status_code == 200 and response.headers["x-served-by"] == "claude"
        assert fake.seen[-1][1] == {**body, "model": MODEL, "stream": stream}  # as sent, the model mapped
    assert json.loads(f.post(path, body).content)["content"][0]["text"] == TEXT
    assert wait_until(lambda: len(f.rows()) == 3)
    for row in f.rows():
        assert (row["served"], row["candidate_status"], row["candidate_tokens"]) == ("candidate", 200, 3)
        assert row["candidate_finish"] == "stop" and row["endpoint"] == "/v1/messages"

    f = front(mode="shadow", weight=100, candidate="claude", anthropic_url=upstream.url)
    response = f.post(path, {**body, "temperature": 0})
    assert response.headers["x-served-by"] == "a" and TEXT not in response.text  # the primary's answer
    shadows = lambda: [r for r in f.rows() if r["kind"] == "shadow"]  # noqa: E731  (f's store holds the canary's too)
    assert wait_until(lambda: len(shadows()) == 1)
    row = shadows()[0]
    assert (row["kind"], row["candidate_status"], row["candidate_tokens"], row["primary_tokens"]) == (
        "shadow",
        200,
        3,
        6,
    )


def test_canary_share_is_the_weight_and_each_key_stays_on_its_side(front):
    """The assignment is sticky per key, so the unit of chance is the key: over 20 keys the candidate's
    share is 30 % within the binomial margin of 20 draws (3 sigma), and it is exactly the keys' hash."""
    f = front(mode="canary", weight=30)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda key: (key, f.chat(key, max_tokens=1)), CANARY_KEYS * 10))
    sides: dict[str, set[str]] = {}
    for key, response in responses:
        assert response.status_code == 200
        sides.setdefault(key, set()).add(response.headers["x-served-by"])
    assert all(len(side) == 1 for side in sides.values())  # sticky
    on_candidate = [k for k, side in sides.items() if side == {"b"}]
    assert set(on_candidate) == {k for k in CANARY_KEYS if bucket(api_key_id(k), "glm-serve") < 30}
    share = len(on_candidate) / len(CANARY_KEYS)
    assert abs(share - 0.30) <= 3 * math.sqrt(0.3 * 0.7 / len(CANARY_KEYS))
    assert wait_until(lambda: len(f.rows()) == 200, timeout=30)
    canary = build_report(f.store, UsageConfig())["pairs"][0]["canary"]
    assert canary["requests"] == 200 and canary["candidate_requests"] == 10 * len(on_candidate)
    assert f.metric("glm_serve:canary_weight", model=MODEL) == 30
    assert f.handle.serving.usage.ledger.flush()
    usage = usage_report(f.ledger, UsageConfig(), None, "backend")  # the ROI view: the canary's share
    assert usage["totals"]["routed_requests"] == 200 and usage["totals"]["local_requests"] == 0
    served = {"a": 200 - canary["candidate_requests"], "b": canary["candidate_requests"]}
    assert {g["backend"]: g["requests"] for g in usage["groups"]} == {k: n for k, n in served.items() if n}


@pytest.mark.parametrize("failure", ["http_500", "black_hole"])
def test_a_failing_candidate_is_rolled_back_and_no_request_is_lost(front, upstreams, failure):
    guards = {"window": 10, "min_samples": 4, "max_error_rate": 0.25}
    if failure == "http_500":
        upstreams["b_engine"].fail_after = 0  # b answers 500 before any output
        f = front(mode="canary", weight=100, guards=guards)
    else:
        f = front(mode="canary", weight=100, guards=guards, candidate="hole")
    for i in range(8):
        response = f.chat(CANARY_KEYS[i], stream=bool(i % 2))
        assert response.status_code == 200 and response.headers["x-served-by"] == "a"  # the primary answered
    assert f.metric("glm_serve:rollbacks_total", model=MODEL, guard="error_rate") == 1
    assert f.metric("glm_serve:canary_weight", model=MODEL) == 0
    report = build_report(f.store, UsageConfig())
    assert [(e["model"], e["guard"], e["weight_before"]) for e in report["rollbacks"]] == [
        (MODEL, "error_rate", 100)
    ]
    tried = len([r for r in f.rows() if r["served"] == "candidate"])
    assert tried == 4  # the window's minimum, then no more candidate traffic
    for key in CANARY_KEYS[:4]:
        assert f.chat(key).headers["x-served-by"] == "a"
    assert len([r for r in f.rows() if r["served"] == "candidate"]) == tried
    table = io_main(["report", "--db", str(f.store)])
    assert "rollback" in table and "error_rate" in table


def io_main(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert routing_main(argv) == 0
    return out.getvalue()


def test_admin_weight_survives_a_restart_and_users_get_403(front, monkeypatch):
    f = front(mode="canary", weight=10)
    denied = f.admin(key=USER, model=MODEL, weight=50)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_key_required"
    assert f.admin(model=MODEL, weight=101).status_code == 400
    assert f.admin(model="other", weight=5).status_code == 404
    assert f.admin(model=MODEL, weight=40).json()["models"][MODEL]["weight"] == 40
    monkeypatch.setenv("GLM_SERVE_ADMIN_KEY", ADMIN)
    assert json.loads(io_main(["set", MODEL, "--weight", "45", "--url", f.handle.url]))["weight"] == 45
    f = front(restart_of=f)
    with httpx.Client(base_url=f.handle.url, timeout=30) as http:
        shown = http.get("/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert shown["models"][MODEL] == {"primary": "a", "candidate": "b", "mode": "canary", "weight": 45}
    assert f.metric("glm_serve:canary_weight", model=MODEL) == 45


def test_shadows_are_bounded_and_cancelled_at_shutdown(front, upstreams):
    f = front(mode="shadow", weight=100, candidate="hole", max_in_flight=2, hole_first_byte_s=30)
    for _ in range(4):
        response = f.chat()
        assert response.status_code == 200 and response.headers["x-served-by"] == "a"
    metrics = f.handle.serving.metrics
    assert wait_until(lambda: len(f.handle.serving.routing.shadows) == 2)
    f.handle.stop()
    text = metrics.render().decode()
    assert metric_value(text, "glm_serve:shadow_dropped_total") == 2
    assert metric_value(text, "glm_serve:shadow_requests_total", result="cancelled") == 2
