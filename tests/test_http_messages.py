"""POST /v1/messages and /v1/messages/count_tokens through the official `anthropic` SDK (2.x), against the
session's engine; GLM thinking and tool use against the tiny random GLM-5 in tests/test_http_agents_glm.py."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import API_KEY, FailingEngine, metric_value

GREEDY = {"temperature": 0}  # the anthropic SDK 2.x takes no temperature argument: it goes in the body
QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]
# Long enough to fill whole KV blocks on both engines (vLLM's CPU backend caches blocks of 128 tokens),
# as agents' system prompts do: only whole blocks are served from the prefix cache.
LONG_SYSTEM = "You are a helpful assistant. Answer in as few words as you can. " * 24


@pytest.fixture(scope="module")
def keyed(make_server) -> Any:
    return make_server(api_keys=[API_KEY])


def sdk(server: Any, api_key: str = API_KEY, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, timeout=120, **kwargs)


def test_create_answers_a_message_with_text_usage_and_stop_reason(keyed):
    client = sdk(keyed)
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=8, messages=QUESTION, system=LONG_SYSTEM, extra_body=GREEDY
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sonnet-4-5"  # the alias the client used
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason in ("max_tokens", "end_turn") and message.stop_sequence is None
    assert message.usage.output_tokens <= 8
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 10
    again = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=QUESTION,
                                   system=LONG_SYSTEM, extra_body=GREEDY)  # fmt: skip
    assert again.content[0].text == message.content[0].text  # greedy: the same answer
    assert again.usage.cache_read_input_tokens > 0  # the prefix cache served the repeated prompt
    total = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


def test_stream_events_and_the_sdks_accumulated_message(keyed):
    client = sdk(keyed)
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=12, messages=QUESTION, extra_body=GREEDY
    ) as s:
        events = list(s)
        final = s.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and "message_stop" in kinds and "content_block_start" in kinds
    raw_types = {e.type for e in events}
    assert {"message_delta", "content_block_delta", "content_block_stop"} <= raw_types
    streamed = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert final.content[0].type == "text" and final.content[0].text == streamed and streamed
    assert final.stop_reason in ("max_tokens", "end_turn") and 0 < final.usage.output_tokens <= 12
    whole = client.messages.create(
        model="claude-haiku-4-5", max_tokens=12, messages=QUESTION, extra_body=GREEDY
    )
    assert whole.content[0].text == streamed


def test_raw_stream_sends_ping_and_anthropic_event_names(keyed):
    body = {"model": "claude-x", "max_tokens": 3, "messages": QUESTION, "stream": True}
    with keyed.http() as http:
        response = http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    names = [line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]


def test_stop_sequence_is_reported(keyed):
    client = sdk(keyed)
    first = client.messages.create(model="claude-x", max_tokens=16, messages=QUESTION, extra_body=GREEDY)
    words = first.content[0].text.split()
    if len(words) < 2:
        pytest.skip("the model's greedy answer has no second word to stop at")
    stop = words[1]
    stopped = client.messages.create(
        model="claude-x", max_tokens=16, messages=QUESTION, stop_sequences=[stop], extra_body=GREEDY
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stop not in stopped.content[0].text


def test_count_tokens_matches_the_prompt_a_message_uses(keyed):
    client = sdk(keyed)
    counted = client.messages.count_tokens(model="claude-x", messages=QUESTION, system="Be brief.")
    message = client.messages.create(model="claude-x", max_tokens=1, messages=QUESTION, system="Be brief.")
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0) > 0


def test_x_api_key_and_bearer_both_authenticate_and_errors_take_anthropics_shape(keyed):
    assert sdk(keyed).messages.create(model="claude-x", max_tokens=1, messages=QUESTION).content is not None
    bearer = anthropic.Anthropic(
        base_url=keyed.url, auth_token=API_KEY, max_retries=0
    )  # ANTHROPIC_AUTH_TOKEN
    assert bearer.messages.create(model="claude-x", max_tokens=1, messages=QUESTION).usage.output_tokens == 1
    with pytest.raises(anthropic.AuthenticationError) as wrong_key:
        sdk(keyed, api_key="sk-wrong").messages.create(model="claude-x", max_tokens=1, messages=QUESTION)
    assert wrong_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        sdk(keyed).messages.create(model="gpt-nonexistent", max_tokens=1, messages=QUESTION)
    assert unknown.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `gpt-nonexistent` does not exist."},
    }
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk(keyed).messages.create(model="claude-x", max_tokens=0, messages=QUESTION)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]


@pytest.mark.parametrize(
    "body, names",
    [
        ({"messages": QUESTION}, "max_tokens"),
        ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"max_tokens": 4, "messages": QUESTION, "tools": [{"type": "web_search_20250305", "name": "w"}]}, "web_search"),
        ({"max_tokens": 4, "messages": QUESTION, "stop_sequences": [""]}, "stop_sequences"),
        ({"max_tokens": 4, "messages": QUESTION, "thinking": {"type": "enabled", "budget_tokens": 8}}, "budget_tokens"),
        ({"max_tokens": 4, "messages": QUESTION, "temperature": 1.5}, "temperature"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_invalid_request_errors_naming_the_problem(keyed, body, names):
    with keyed.http() as http:
        response = http.post("/v1/messages", json={"model": "claude-x", **body})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert names in error["error"]["message"]


def test_wrong_key_gets_anthropic_401_with_x_api_key(keyed):
    response = httpx.post(
        f"{keyed.url}/v1/messages", headers={"x-api-key": "nope"},
        json={"model": "claude-x", "max_tokens": 1, "messages": QUESTION}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_an_engine_failure_mid_stream_ends_with_an_error_event(make_server, engine):
    failing = make_server(engine_override=FailingEngine(engine, after=2))
    body = {"model": "claude-x", "max_tokens": 8, "messages": QUESTION, "stream": True}
    with failing.http() as http:
        response = http.post("/v1/messages", json=body)
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith(("event: ", "data: "))]
    assert events[-2] == "event: error" and '"type":"api_error"' in events[-1]
    assert FailingEngine.SECRET not in response.text
    with failing.http() as http:
        whole = http.post("/v1/messages", json={**body, "stream": False})
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "api_error"


def test_metrics_and_openapi_name_the_routes(keyed):
    sdk(keyed).messages.create(model="claude-x", max_tokens=1, messages=QUESTION)
    with keyed.http() as http:
        metrics = http.get("/metrics").text
        paths = http.get("/openapi.json").json()["paths"]
    assert metric_value(metrics, "glm_serve:http_requests_total", route="/v1/messages", status="200") >= 1
    assert {
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/{response_id}",
    } <= set(paths)
