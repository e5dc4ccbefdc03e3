"""Operations: models/health/version/tokenize, metrics, access log, client disconnects, concurrency,
and the loading state."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import httpx
import pytest
from openai.types import Model

from tests.conftest import metric_value, wait_until

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
REQUIRED_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
]  # fmt: skip


def scrape(server) -> str:
    with httpx.Client(timeout=30) as http:
        response = http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def engine_idle(server) -> bool:
    text = scrape(server)
    return (
        metric_value(text, "vllm:kv_cache_usage_perc") == 0.0
        and metric_value(text, "vllm:num_requests_running") == 0.0
        and metric_value(text, "vllm:num_requests_waiting") == 0.0
    )


def aborted_count(server) -> float:
    return metric_value(scrape(server), "vllm:request_success_total", finished_reason="abort") or 0.0


def long_budget(engine) -> int:
    return min(800, engine.max_model_len - 100)


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.serving.served_model_name]
    with server.http() as http:
        raw = http.get("/v1/models").json()
        assert raw["object"] == "list"
        Model.model_validate(raw["data"][0])
        health = http.get("/health")
        version = http.get("/version")
    assert health.status_code == 200 and health.json() == {"status": "serving"}
    assert version.status_code == 200 and version.json()["version"]


def test_tokenize_detokenize_round_trip(server, engine):
    text = "Hello, tokenizer! 123"
    with server.http() as http:
        tokenized = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
        assert tokenized["max_model_len"] == engine.max_model_len
        detokenized = http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()
        assert detokenized["prompt"].strip() == text
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat["count"] > 0
        assert http.post("/tokenize", json={"prompt": "x", "messages": MESSAGES}).status_code == 400
        assert http.post("/detokenize", json={"tokens": [-5]}).status_code == 400


def test_metrics_have_vllm_names_and_http_counts(server, client):
    client.chat.completions.create(model=server.serving.served_model_name, messages=MESSAGES, max_tokens=4)
    with server.http() as http:
        http.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 9})
    text = scrape(server)
    for name in REQUIRED_METRICS:
        assert metric_value(text, name) is not None, name
    for name in REQUIRED_METRICS[6:]:
        assert metric_value(text, name) > 0, name
    assert metric_value(text, "vllm:generation_tokens_total") >= 4
    assert metric_value(text, "vllm:request_success_total") is not None
    ok = metric_value(text, "glm_serve:http_requests_total", route="/v1/chat/completions", status="200")
    bad = metric_value(text, "glm_serve:http_requests_total", route="/v1/chat/completions", status="400")
    assert ok >= 1 and bad >= 1


def _access_records(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "glm_serve.access"]


def test_access_log_line_per_request(make_server, caplog):
    server = make_server()
    with caplog.at_level(logging.INFO, logger="glm_serve.access"):
        server.client().chat.completions.create(
            model=server.serving.served_model_name, messages=MESSAGES, max_tokens=3
        )
        with server.http() as http:
            http.post("/v1/chat/completions", json={"messages": []})
        # the line is written when the response is complete, which may be just after the client has it
        assert wait_until(lambda: len(_access_records(caplog)) >= 2)
    records = _access_records(caplog)
    ok = next(r for r in records if r.get("status") == 200)
    assert ok["id"].startswith("chatcmpl-") and ok["model"] == server.serving.served_model_name
    assert ok["path"] == "/v1/chat/completions" and ok["completion_tokens"] >= 1 and ok["prompt_tokens"] > 0
    assert ok["ttft_s"] >= 0 and ok["latency_s"] >= ok["ttft_s"] and ok["finish_reasons"]
    assert "prompt" not in ok
    assert any(r.get("status") == 400 for r in records)

    logging_server = make_server(log_prompts=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="glm_serve.access"):
        logging_server.client().completions.create(
            model=logging_server.serving.served_model_name, prompt="secret prompt", max_tokens=2
        )
        assert wait_until(lambda: len(_access_records(caplog)) >= 1)
    assert _access_records(caplog)[-1]["prompt"] == ["secret prompt"]


def test_streaming_disconnect_frees_kv(server, client, engine):
    assert wait_until(lambda: engine_idle(server))
    before = aborted_count(server)
    stream = client.chat.completions.create(
        model=server.serving.served_model_name, messages=MESSAGES, max_tokens=long_budget(engine), stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for _, _chunk in zip(range(4), stream, strict=False):
        pass
    busy = scrape(server)
    assert metric_value(busy, "vllm:num_requests_running") == 1.0
    assert metric_value(busy, "vllm:kv_cache_usage_perc") > 0.0
    stream.close()
    assert wait_until(lambda: engine_idle(server), timeout=5), scrape(server)
    assert aborted_count(server) == before + 1


def test_non_streaming_disconnect_aborts(server, engine):
    assert wait_until(lambda: engine_idle(server))
    before = aborted_count(server)
    body = {"messages": MESSAGES, "max_tokens": long_budget(engine), "ignore_eos": True}
    with server.http(timeout=httpx.Timeout(30, read=0.5)) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body)
    assert wait_until(lambda: engine_idle(server), timeout=5), scrape(server)
    assert aborted_count(server) == before + 1


def test_concurrent_streaming_clients(server, engine):
    """64 clients stream at once; each gets every chunk and exact usage."""
    clients = 64
    max_tokens = 16

    async def one(i: int, client) -> tuple[str, object, list[str]]:
        messages = [{"role": "user", "content": f"Client {i}: count to {i % 7 + 3}."}]
        stream = await client.chat.completions.create(
            model=server.serving.served_model_name, messages=messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        content, finishes, usage = [], [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        return "".join(content), usage, finishes

    async def run_all():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(i, client) for i in range(clients)))

    results = asyncio.run(run_all())
    with server.http() as http:
        counts = [
            http.post(
                "/tokenize",
                json={"messages": [{"role": "user", "content": f"Client {i}: count to {i % 7 + 3}."}]},
            ).json()["count"]
            for i in range(clients)
        ]
    for (text, usage, finishes), prompt_tokens in zip(results, counts, strict=True):
        assert finishes == ["length"]
        assert usage.completion_tokens == max_tokens and usage.prompt_tokens == prompt_tokens
        assert isinstance(text, str)
    assert wait_until(lambda: engine_idle(server), timeout=10)


def test_health_is_503_while_loading(make_server, engine):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return engine

    server = make_server(engine_override=slow_factory, wait_ready=False)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        loading = http.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert "retry-after" in loading.headers
        assert http.post("/v1/chat/completions", json={"messages": MESSAGES}).status_code == 503
        assert http.get("/metrics").status_code == 200
        release.set()
        assert wait_until(lambda: http.get("/health").status_code == 200, timeout=10)
