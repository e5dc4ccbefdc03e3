"""Every error is OpenAI's error object with the right status: 400 (not 422), 401, 404, 413, 503 with
Retry-After, 500 without the detail; an error after a stream started is an SSE error event + [DONE]."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from tests.conftest import API_KEY, DeadEngine, FailingEngine, QueueFullEngine, metric_value

MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def post_chat(server, **body):
    body.setdefault("model", server.serving.served_model_name)
    body.setdefault("messages", MESSAGES)
    with server.http() as http:
        return http.post("/v1/chat/completions", json=body)


def post_completion(server, **body):
    body.setdefault("model", server.serving.served_model_name)
    body.setdefault("prompt", "hello")
    with server.http() as http:
        return http.post("/v1/completions", json=body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ""}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
        ),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_chat_invalid_fields_are_400(server, body, param):
    assert_error(post_chat(server, **body), 400, param=param)


def test_missing_messages_is_400_naming_the_field(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": server.serving.served_model_name})
    assert_error(response, 400, param="messages", code="missing_required_parameter")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_completion_invalid_fields_are_400(server, body, param):
    assert_error(post_completion(server, **body), 400, param=param)


def test_invalid_json_is_400(server):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
    assert_error(response, 400, code="invalid_json")


def test_large_bodies_parsed_off_the_loop_answer_exactly_as_small_ones(server):
    """Bodies past the guard's pool threshold are parsed in the front-end pool (server/asgi_body.py)."""
    pad = b" " * 200_000  # JSON white space: the same document, five times the pool threshold
    bodies = {
        "broken JSON": b'{"model": "x", "messages": [',
        "invalid UTF-8": b'{"model": "x", "messages": [], "user": "\xff"}',
        "not an object": b"[1, 2]",
        "wrong type": b'{"model": "x", "messages": "hi"}',
    }
    with server.http(
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    ) as http:
        for name, body in bodies.items():
            small = http.post("/v1/chat/completions", content=body)
            large = http.post("/v1/chat/completions", content=pad + body + pad)
            assert small.status_code == 400 and (large.status_code, large.json()) == (400, small.json()), name
        valid = json.dumps({"model": server.serving.served_model_name, "messages": MESSAGES, "max_tokens": 1})
        assert http.post("/v1/chat/completions", content=pad + valid.encode()).status_code == 200


def test_body_must_be_a_json_object(server):
    with server.http() as http:
        assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400, code="invalid_body")
        no_content_type = http.post(
            "/v1/chat/completions",
            content=json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode(),
            headers={"content-type": ""},
        )
        assert no_content_type.status_code == 200, no_content_type.text


def test_context_length_is_400(server, engine):
    error = assert_error(post_chat(server, max_tokens=engine.max_model_len), 400, param="max_tokens")
    assert error["code"] == "context_length_exceeded"
    long_prompt = list(range(1, 50)) * (engine.max_model_len // 40)
    assert_error(post_completion(server, prompt=long_prompt, max_tokens=1), 400, param="prompt",
                 code="context_length_exceeded")  # fmt: skip
    assert_error(
        post_completion(server, max_tokens=engine.max_model_len), 400, code="context_length_exceeded"
    )


def test_unknown_model_is_404(server):
    assert_error(post_chat(server, model="gpt-17"), 404, param="model", code="model_not_found")
    assert_error(post_completion(server, model="gpt-17"), 404, param="model")
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-17", messages=MESSAGES)


def test_unknown_route_and_method(server):
    with server.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)


def test_api_keys(make_server, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# operators\n{API_KEY}\n\nsk-other\n")
    server = make_server(api_key_file=str(key_file))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert_error(http.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert_error(http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 200
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert_error(http.post("/tokenize", json={"prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").models.list()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "glm_serve:http_requests_total", route="/v1/models", status="401") >= 2
    assert server.client().models.list().data[0].id == server.serving.served_model_name

    protected = make_server(api_keys=[API_KEY], protect_metrics=True)
    with httpx.Client(base_url=protected.url, timeout=30) as http:
        assert_error(http.get("/metrics"), 401)
        assert http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200


def test_body_limit_is_413(make_server):
    server = make_server(max_body_bytes=2048)
    big = {"model": server.serving.served_model_name, "messages": [{"role": "user", "content": "x" * 4096}]}
    with server.http() as http:
        assert_error(http.post("/v1/chat/completions", json=big), 413)

        def chunked_body():  # no Content-Length: the limit applies to the streamed size
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(8):
                yield b"y" * 512
            yield b'"}]}'

        response = http.post(
            "/v1/chat/completions", content=chunked_body(), headers={"content-type": "application/json"}
        )
        assert_error(response, 413)
        assert post_chat(server, max_tokens=1).status_code == 200


def test_queue_full_is_503_with_retry_after(make_server, engine):
    server = make_server(engine_override=QueueFullEngine(engine, num_waiting=4), max_queued_requests=4)
    response = post_chat(server, max_tokens=1)
    assert_error(response, 503, code="queue_full")
    assert int(response.headers["retry-after"]) >= 1
    assert_error(post_completion(server, max_tokens=1), 503)
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model=server.serving.served_model_name, messages=MESSAGES)
    assert info.value.status_code == 503

    roomy = make_server(engine_override=QueueFullEngine(engine, num_waiting=4), max_queued_requests=5)
    assert post_chat(roomy, max_tokens=1).status_code == 200


def test_draining_is_503_and_health_503(make_server):
    server = make_server()
    server.serving.draining = True
    try:
        response = post_chat(server, max_tokens=1)
        assert_error(response, 503, code="server_draining")
        assert "retry-after" in response.headers
        with server.http() as http:
            assert_error(http.get("/health"), 503)
    finally:
        server.serving.draining = False


def test_dead_engine_makes_health_503(make_server, engine):
    server = make_server(engine_override=DeadEngine(engine))
    with server.http() as http:
        assert_error(http.get("/health"), 503, code="engine_dead")
    assert_error(post_chat(server, max_tokens=1), 503)


def test_bug_before_output_is_500_without_detail(make_server, engine, caplog):
    server = make_server(engine_override=FailingEngine(engine, after=0))
    with caplog.at_level(logging.ERROR):
        response = post_chat(server, max_tokens=4)
        stream = post_chat(server, max_tokens=4, stream=True)
    for r in (response, stream):
        error = assert_error(r, 500)
        assert FailingEngine.SECRET not in r.text
        assert "request id" in error["message"]
    assert FailingEngine.SECRET in caplog.text
    assert_error(post_completion(server, max_tokens=4), 500)


def test_error_after_stream_started_is_an_sse_event(make_server, engine):
    server = make_server(engine_override=FailingEngine(engine, after=2))
    body = {"model": server.serving.served_model_name, "messages": MESSAGES, "max_tokens": 20, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and FailingEngine.SECRET not in events[-2]
    with pytest.raises(openai.APIError):
        for _ in server.client().chat.completions.create(stream=True, **{k: body[k] for k in ("model", "messages")},
                                                          extra_body={"ignore_eos": True}, max_tokens=20):  # fmt: skip
            pass
    completion = {
        "model": body["model"],
        "prompt": "hi",
        "max_tokens": 20,
        "stream": True,
        "ignore_eos": True,
    }
    with server.http() as http, http.stream("POST", "/v1/completions", json=completion) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2]
