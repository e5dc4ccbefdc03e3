"""Routing without servers: the config, the sticky assignment, the guards, the comparison measures, the
plan (who serves, who shadows) and the store's migrations. tests/test_routing_http.py runs real servers."""

from __future__ import annotations

import json
import math
import sqlite3
from types import SimpleNamespace

import pytest

from server.api_keys import ApiKey, api_key_id
from server.config import ConfigError
from server.errors import APIError
from server.routing import GuardConfig, GuardWindow, Mode, Sample, bucket, parse_routing_config
from server.routing_compare import Outcome, ToolCall, json_valid, rouge_l, tool_calls_agree
from server.routing_read import read_outcome
from server.routing_report import build_report
from server.routing_service import RoutingService
from server.routing_store import ROUTING_TABLES_SINCE, ComparisonRow, RoutingStore
from server.usage import UsageConfig, UsageLedger
from server.usage_schema import MIGRATIONS, SCHEMA_VERSION, schema_version

TARGET = {"base_url": "http://127.0.0.1:9/v1"}


def section(**route: object) -> dict:
    return {
        "enabled": True,
        "targets": {"cloud": TARGET},
        "models": {
            "glm-5": {"primary": "local", "candidate": "cloud", "mode": "canary", "weight": 30, **route}
        },
    }


def test_config_parses_and_names_what_is_wrong():
    cfg = parse_routing_config(section())
    assert cfg.models["glm-5"].mode is Mode.CANARY and cfg.models["glm-5"].weight == 30
    assert parse_routing_config(None).enabled is False
    bad = [
        ({**section(), "colour": 1}, "routing.colour"),
        (section(candidate="nowhere"), "unknown target 'nowhere'"),
        (section(mode="blue"), "routing.models.glm-5.mode.*'off', 'shadow' or 'canary'"),
        (
            {**section(), "targets": {"cloud": {"base_urll": "http://x"}}},
            "did you mean 'routing.targets.cloud.base_url'",
        ),
        ({**section(), "targets": {"cloud": {}}}, "routing.targets.cloud.base_url' is required"),
        (section(weight=120), "0 to 100"),
        (section(candidate=None), "needs a candidate"),
        ({**section(), "targets": {"local": TARGET}}, "reserved"),
        ({**section(), "targets": {"cloud": {"base_url": "ftp://x"}}}, "an http\\(s\\) URL"),
        ({**section(), "guards": {"window": 5, "min_samples": 9}}, "min_samples"),
    ]
    for value, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_routing_config(value)


def test_sticky_buckets_split_many_keys_at_the_weight():
    keys = [api_key_id(f"sk-{i}") for i in range(10_000)]
    share = sum(bucket(k, "salt") < 30 for k in keys) / len(keys)
    assert abs(share - 0.30) <= 3 * math.sqrt(0.3 * 0.7 / len(keys))
    assert all(bucket(k, "salt") == bucket(k, "salt") for k in keys[:100])
    # raising the weight only adds keys: every key under 10 % is also under 30 %
    assert {k for k in keys if bucket(k, "salt") < 10} <= {k for k in keys if bucket(k, "salt") < 30}
    assert sum(bucket(k, "other") < 30 for k in keys[:100]) != sum(bucket(k, "salt") < 30 for k in keys[:100])


def test_guards_trip_on_errors_latency_and_validity_only_with_enough_samples():
    window = GuardWindow(GuardConfig(window=10, min_samples=4, max_error_rate=0.25))
    for _ in range(3):
        window.candidate.append(Sample(False, None, 1.0))
    assert window.tripped() is None  # 3 < min_samples
    window.candidate.append(Sample(True, 0.1, 1.0))
    assert window.tripped()[0] == "error_rate"

    window = GuardWindow(GuardConfig(window=10, min_samples=4, max_ttft_ratio=2.0))
    for _ in range(4):
        window.primary.append(Sample(True, 0.1, 1.0))
        window.candidate.append(Sample(True, 0.5, 1.0))
    assert window.tripped()[0] == "ttft_ratio"

    window = GuardWindow(GuardConfig(window=10, min_samples=4, min_json_valid_rate=0.8))
    for valid in (True, True, False, False):
        window.candidate.append(Sample(True, 0.1, 1.0, json_ok=valid))
    assert window.tripped()[0] == "json_validity"


def test_similarity_tool_calls_and_json_validity():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c d", "x y z") == 0.0
    assert 0.0 < rouge_l("the cat sat on the mat", "the cat lay on a mat") < 1.0
    tools = [{"type": "function", "function": {"name": "get", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    a, b = Outcome("a", 200), Outcome("b", 200)
    a.tool_calls, b.tool_calls = [ToolCall("get", '{"city": "Paris"}')], [ToolCall("get", '{"city":"Paris"}')]
    assert tool_calls_agree(a, b, tools) is True
    b.tool_calls = [ToolCall("get", '{"town": "Paris"}')]
    assert tool_calls_agree(a, b, tools) is False
    assert tool_calls_agree(a, b, None) is None
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["x"]}}}
    a.text, b.text = '{"x": 1}', '{"y": 1}'
    assert json_valid(a, fmt) is True and json_valid(b, fmt) is False and json_valid(a, None) is None


def test_outcomes_read_from_sse_and_json():
    sse = (
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    out = read_outcome("t", 200, sse, 1.0, 0.1)
    assert (out.text, out.finish_reason, out.output_tokens, out.prompt_tokens, out.ok) == (
        "Hello",
        "length",
        2,
        5,
        True,
    )
    cut = read_outcome("t", 200, sse.replace(b"data: [DONE]\n\n", b""), 1.0, 0.1)
    assert not cut.ok and "[DONE]" in cut.error
    body = (
        b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"completion_tokens":1}}'
    )
    assert read_outcome("t", 200, body, 1.0, None).text == "hi"
    assert not read_outcome("t", 500, b"{}", 1.0, None).ok


def _agent_answers(api: str) -> tuple[bytes, bytes]:
    """One answer (text, then a tool call) of `api` as this server writes it: (JSON body, SSE stream)."""
    from server.protocol import AssistantMessage, DeltaToolCall
    from server.routes.anthropic_events import AnthropicEncoder
    from server.routes.api_encoder import Outcome as Ended
    from server.routes.chat_output import MessageDelta
    from server.routes.responses_events import ResponsesEncoder

    def encoder():
        return (
            AnthropicEncoder("msg_1", "claude-x")
            if api == "messages"
            else ResponsesEncoder("resp_1", {}, print)
        )

    call = {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Oslo"}'}}
    ended = Ended("tool_calls", None, prompt_tokens=7, completion_tokens=4)
    message = AssistantMessage.model_validate(
        {"role": "assistant", "content": "hi there", "tool_calls": [call]}
    )
    body = json.dumps(encoder().complete(message, ended)).encode()
    stream = encoder()
    chunks = [stream.start(7, 0), stream.delta(MessageDelta(content="hi there"))]
    chunks.append(stream.delta(MessageDelta(tool_calls=[DeltaToolCall.model_validate({"index": 0, **call})])))
    chunks.append(stream.finish(ended))
    return body, b"".join(chunks)


@pytest.mark.parametrize("api", ["messages", "responses"])
def test_outcomes_of_agent_apis_read_in_chat_terms(api):
    for raw in _agent_answers(api):
        out = read_outcome("t", 200, raw, 1.0, 0.1, api)
        assert out.ok, out.error
        assert (out.text, out.finish_reason, out.prompt_tokens, out.output_tokens) == (
            "hi there",
            "tool_calls",
            7,
            4,
        )
        assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get", {"city": "Oslo"})]
    cut = read_outcome("t", 200, _agent_answers(api)[1][:-40], 1.0, 0.1, api)
    assert not cut.ok and "ended before" in cut.error


def _service(tmp_path, **route: object) -> RoutingService:
    cfg = parse_routing_config(section(**route))
    from prometheus_client import CollectorRegistry

    from server.routing_targets import Target

    serving = SimpleNamespace(draining=False, ready=True, served_model_name="glm-5", overflow=None,
                              config=SimpleNamespace(extra={}))  # fmt: skip
    targets = {"local": Target("local"), "cloud": Target("cloud", client=object(), breaker=None)}
    return RoutingService(cfg, RoutingStore(tmp_path / "usage.sqlite"), CollectorRegistry(), targets, serving)


def _scope(key: ApiKey, path: str = "/v1/chat/completions", **headers: str) -> dict:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return {"path": path, "headers": raw, "state": {"api_key": key}}


def test_plan_keeps_sovereign_requests_home_and_checks_x_route(tmp_path):
    service = _service(tmp_path, primary="cloud", candidate="local", mode="shadow", weight=100)
    user, sovereign = ApiKey("u1"), ApiKey("s1", sovereign=True)
    plan = service.plan(_scope(user), {"model": "glm-5"})
    assert plan.served.name == "cloud" and plan.shadow.name == "local"
    plan = service.plan(_scope(sovereign), {"model": "glm-5"})
    assert plan.served.name == "local" and plan.shadow is None  # served here, not twice
    plan = service.plan(_scope(user, **{"x-overflow": "never"}), {"model": "glm-5"})
    assert plan.served.name == "local"

    service = _service(tmp_path, mode="shadow", weight=100)  # primary local, candidate cloud
    assert service.plan(_scope(sovereign), {"model": "glm-5"}).shadow is None
    assert service.plan(_scope(user), {"model": "glm-5"}).shadow.name == "cloud"
    with pytest.raises(APIError) as denied:
        service.plan(_scope(user, **{"x-route": "candidate"}), {"model": "glm-5"})
    assert denied.value.status == 403
    forced = service.plan(_scope(ApiKey("a", admin=True), **{"x-route": "candidate"}), {"model": "glm-5"})
    assert forced.served.name == "cloud" and forced.fallback.name == "local"
    assert service.plan(_scope(user), {"model": "other"}) is None


def test_messages_and_responses_are_planned_by_their_resolved_model_in_chat_terms(tmp_path):
    service = _service(tmp_path, mode="shadow", weight=100)
    tool = {"name": "get", "input_schema": {"type": "object"}}
    message = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    plan = service.plan(_scope(ApiKey("u1"), "/v1/messages"), {**message, "tools": [tool]})
    assert (plan.model, plan.path, plan.shadow.name) == ("glm-5", "messages", "cloud")  # claude-* is an alias
    assert plan.chat["tools"][0]["function"]["name"] == "get" and plan.chat["messages"][-1]["content"] == "hi"
    assert service.plan(_scope(ApiKey("u1"), "/v1/messages"), {**message, "model": "gpt-4"}) is None  # a 404
    assert service.plan(_scope(ApiKey("u1"), "/v1/messages"), {"model": "glm-5"}) is None  # a 400
    text = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
    plan = service.plan(
        _scope(ApiKey("u1"), "/v1/responses"), {"model": "glm-5", "input": "hi", "text": text}
    )
    assert plan.path == "responses" and plan.chat["response_format"]["type"] == "json_schema"


def test_store_shares_the_ledgers_schema_and_refuses_a_newer_file(tmp_path):
    path = tmp_path / "usage.sqlite"
    UsageLedger(path).close()  # the ledger and the routing store open one file, in either order
    store = RoutingStore(path)
    store.add_comparison(
        ComparisonRow(1.0, "shadow", "m", "/v1/chat/completions", "id", "k", "a", "b", "primary")
    )
    store.set_weight("m", 40, "admin")
    store.close()
    store = RoutingStore(path)  # reopening runs no migration twice
    assert store.weights() == {"m": 40.0}
    store.close()
    with sqlite3.connect(path) as db:
        assert schema_version(db) == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="routing store: .* newer than"):
        RoutingStore(path)


def test_a_ledger_of_schema_version_2_gains_the_routing_tables_with_its_rows_intact(tmp_path):
    path = tmp_path / "usage.sqlite"
    with sqlite3.connect(path) as db:  # what the release before routing wrote: migrations 1 and 2
        for migration in MIGRATIONS[:2]:
            for statement in migration.statements:
                db.execute(statement)
        db.execute("INSERT INTO usage (request_id, api) VALUES ('chatcmpl-old', 'chat')")
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(ValueError, match="schema version 2.* no routing tables"):
        build_report(path, UsageConfig())
    store = RoutingStore(path)
    store.set_weight("m", 10, "admin")
    store.close()
    with sqlite3.connect(path) as db:
        assert schema_version(db) == SCHEMA_VERSION >= ROUTING_TABLES_SINCE
        assert db.execute("SELECT request_id, api FROM usage").fetchall() == [("chatcmpl-old", "chat")]
    assert build_report(path, UsageConfig())["pairs"] == []


def test_the_overflow_upstream_is_a_target_sharing_its_breaker(monkeypatch):
    from server.overflow import CircuitBreaker, OverflowConfig
    from server.routing_targets import build_targets

    monkeypatch.setenv("GLM_SERVE_TEST_HS_KEY", "sk-hs")
    policy = OverflowConfig(enabled=True, api_key_env="GLM_SERVE_TEST_HS_KEY", models={"glm-5": "glm_5"})
    overflow = SimpleNamespace(policy=policy, breaker=CircuitBreaker(2, 30.0))
    cfg = parse_routing_config(section(candidate="overflow"))
    targets = build_targets(cfg, overflow)
    target = targets["overflow"]
    assert target.breaker is overflow.breaker and target.upstream_model("glm-5") == "glm_5"
    assert target.client.cfg.retries == 0  # routing calls are never retried
    overflow.breaker.record_failure()
    overflow.breaker.record_failure()
    assert not target.available()  # the overflow's open breaker: no canary traffic
    with pytest.raises(ConfigError, match="overflow is not enabled"):
        build_targets(cfg, None)


def test_rows_keep_text_only_when_asked():
    from server.routing import RouteConfig
    from server.routing_track import comparison_row

    plan = SimpleNamespace(
        chat={"messages": [{"role": "user", "content": "secret prompt"}]}, model="glm-5", path="chat/completions",
        request_id="r1", key=ApiKey("k1"), route=RouteConfig("a", "b", Mode.SHADOW, 100), role="primary",
    )  # fmt: skip
    a, b = (
        Outcome("a", 200, 1.0, 0.1, 5, 3, "stop", "hello there"),
        Outcome("b", 200, 2.0, 0.2, 5, 3, "stop", "hello"),
    )
    row = comparison_row("shadow", plan, a, b, store_text=False)
    assert (row.prompt, row.primary_text, row.candidate_text) == (None, None, None)
    assert row.key_id == "k1" and row.similarity == rouge_l("hello there", "hello") and row.prompt_tokens == 5
    row = comparison_row("shadow", plan, a, b, store_text=True)
    assert "secret prompt" in row.prompt and (row.primary_text, row.candidate_text) == (
        "hello there",
        "hello",
    )


def test_a_candidate_with_an_open_breaker_takes_no_canary_traffic(tmp_path):
    from server.overflow import CircuitBreaker

    service = _service(tmp_path, mode="canary", weight=100)
    assert service.plan(_scope(ApiKey("u1")), {"model": "glm-5"}).served.name == "cloud"
    service.targets["cloud"].breaker = CircuitBreaker(1, 600.0)
    service.targets["cloud"].breaker.record_failure()
    plan = service.plan(_scope(ApiKey("u1")), {"model": "glm-5"})
    assert (plan.served.name, plan.role, plan.fallback) == ("local", "primary", None)


def test_a_profile_routing_section_loads_and_its_errors_name_the_key_and_source(tmp_path):
    from server.config import load_config

    profile = tmp_path / "p.yaml"
    profile.write_text(
        "routing:\n  enabled: true\n  targets: {cloud: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "  models: {glm-5: {primary: local, candidate: cloud, mode: shadow, weight: 10}}\n"
        "agent_apis:\n  responses_store: false\n"
    )
    environ = {"GLM_SERVE_ROUTING__MODELS": "{glm-5: {primary: local, candidate: cloud, mode: canary}}"}
    cfg = load_config(profile, {"routing.salt": "s"}, environ=environ)
    routing = parse_routing_config(cfg.extra["routing"])
    assert routing.salt == "s" and routing.models["glm-5"].mode is Mode.CANARY  # the environment wins
    assert cfg.extra["agent_apis"] == {"responses_store": False}
    profile.write_text("routing:\n  models: {glm-5: {primary: local, wieght: 5}}\n")
    with pytest.raises(
        ConfigError, match=f"'routing.models.glm-5.wieght' \\(profile {profile}\\); did you mean"
    ):
        load_config(profile)
