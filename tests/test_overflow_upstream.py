"""The upstream client and pass-through against httpx's in-process MockTransport (no sockets): retries
only before the first byte, connect and first-byte timeouts, error statuses, SSE rewriting and the tally."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from server.overflow import UpstreamConfig
from server.overflow_upstream import (
    SseRewriter,
    Tally,
    UpstreamClient,
    UpstreamError,
    next_chunk,
    read_body,
    rewrite_json,
    stream_events,
)
from server.request_record import RequestRecord

FAST = UpstreamConfig(
    connect_timeout_s=0.5, first_byte_timeout_s=0.3, idle_timeout_s=0.3, retries=2, retry_backoff_s=0.01
)


def filled(tally: Tally) -> RequestRecord:
    """The fields a tally writes into a request's record (its access line and ledger row)."""
    record = RequestRecord()
    tally.fill(record)
    return record


class Stream(httpx.AsyncByteStream):
    """A response body: (delay_s, bytes) parts; bytes None raises a read error there."""

    def __init__(self, parts: list[tuple[float, bytes | None]]) -> None:
        self.parts = parts

    async def __aiter__(self):
        for delay, data in self.parts:
            await asyncio.sleep(delay)
            if data is None:
                raise httpx.ReadError("connection reset")
            yield data


def client_for(handler, cfg: UpstreamConfig = FAST) -> UpstreamClient:
    return UpstreamClient("http://upstream.test/v1", "sk-up", cfg, transport=httpx.MockTransport(handler))


def run(coro):
    return asyncio.run(coro)


def sse(*chunks: dict, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def test_request_shape_and_first_byte():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Stream([(0, b'{"ok":'), (0, b"true}")]))

    async def go():
        client = client_for(handler)
        opened = await client.open("chat/completions", {"model": "glm_5"})
        body = await read_body(opened, 1.0)
        await opened.aclose()
        await client.aclose()
        return opened.first, body

    first, body = run(go())
    assert first == b'{"ok":' and body == b'{"ok":true}'
    assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
    assert seen[0].headers["authorization"] == "Bearer sk-up"
    assert json.loads(seen[0].content) == {"model": "glm_5"}


@pytest.mark.parametrize(
    ("failures", "expected_attempts", "ok"),
    [
        (["connect"], 2, True),
        (["503", "timeout"], 3, True),
        (["connect", "connect", "connect"], 3, False),
        (["400"], 1, False),  # not retried: the upstream refused this request
        (["401"], 1, False),
    ],
)
def test_retries_only_transient_failures_before_the_first_byte(failures, expected_attempts, ok):
    attempts = []

    async def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(time.monotonic())
        failure = failures[len(attempts) - 1] if len(attempts) <= len(failures) else None
        if failure == "connect":
            raise httpx.ConnectError("refused")
        if failure == "timeout":
            return httpx.Response(200, stream=Stream([(5.0, b"late")]))
        if failure is not None:
            return httpx.Response(int(failure), json={"error": {"message": f"upstream says {failure}"}})
        return httpx.Response(200, stream=Stream([(0, b"{}")]))

    async def go():
        client = client_for(handler)
        try:
            opened = await client.open("chat/completions", {})
            await opened.aclose()
            return None
        except UpstreamError as exc:
            return exc
        finally:
            await client.aclose()

    error = run(go())
    assert len(attempts) == expected_attempts
    assert (error is None) == ok
    if failures == ["400"]:
        assert error.status == 400 and not error.breaker and "upstream says 400" in str(error)
    if failures == ["401"]:
        assert error.breaker  # our key is wrong: the upstream is unusable
    if not ok and failures[0] == "connect":
        assert error.breaker and error.retryable


def test_first_byte_timeout_counts_from_the_request_and_body_stalls_are_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=Stream([(0, b"data: 1\n\n"), (1.0, b"data: 2\n\n")]))

    async def go():
        client = client_for(handler)
        opened = await client.open("completions", {})
        with pytest.raises(UpstreamError, match="no data"):
            await next_chunk(opened, 0.2)
        await opened.aclose()
        await client.aclose()

    run(go())
    assert calls == [1]  # the stall after the first byte is not retried

    start = time.monotonic()

    def silent(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream([(10.0, b"x")]))

    async def go_silent():
        client = client_for(
            silent, UpstreamConfig(connect_timeout_s=0.1, first_byte_timeout_s=0.2, retries=0)
        )
        try:
            await client.open("completions", {})
        finally:
            await client.aclose()

    with pytest.raises(UpstreamError, match="no first byte"):
        run(go_silent())
    assert time.monotonic() - start < 2.0


def test_sse_rewriter_sets_the_local_model_and_keeps_usage_for_the_ledger():
    tally = Tally(local_prompt_tokens=7)
    rewriter = SseRewriter("glm-5", "chatcmpl-local", include_usage=False, tally=tally)
    body = sse(
        {
            "id": "up-1",
            "model": "glm_5",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        },
        {
            "id": "up-1",
            "model": "glm_5",
            "choices": [{"index": 0, "delta": {"content": "Hi"}}],
            "usage": None,
        },
        {"id": "up-1", "model": "glm_5", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {
            "id": "up-1",
            "model": "glm_5",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2},
        },
    ).replace(b"\n", b"\r\n")
    out = b"".join(rewriter.feed(body[i : i + 7]) for i in range(0, len(body), 7))  # split anywhere
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and rewriter.done
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert len(chunks) == 3  # the usage chunk the client did not ask for is dropped
    assert {c["model"] for c in chunks} == {"glm-5"} and {c["id"] for c in chunks} == {"chatcmpl-local"}
    assert all(c["usage"] is None for c in chunks)
    fields = filled(tally)
    assert fields.prompt_tokens == 9 and fields.completion_tokens == 2 and fields.tokens_exact
    assert fields.finish_reasons == ["length"] and fields.ttft_s is not None


def test_abandoned_stream_without_usage_is_estimated():
    tally = Tally(local_prompt_tokens=7)
    rewriter = SseRewriter("glm-5", "r", include_usage=True, tally=tally)
    rewriter.feed(
        sse({"choices": [{"index": 0, "text": "a"}]}, {"choices": [{"index": 0, "text": "b"}]}, done=False)
    )
    tally.ended = "abort"
    fields = filled(tally)
    assert (fields.prompt_tokens, fields.completion_tokens, fields.tokens_exact) == (7, 2, False)
    assert fields.finish_reasons == ["abort"]


def test_a_stream_broken_after_the_first_byte_ends_with_an_openai_error_event():
    def handler(request: httpx.Request) -> httpx.Response:
        first = sse({"choices": [{"index": 0, "delta": {"content": "x"}}]}, done=False)
        return httpx.Response(200, stream=Stream([(0, first), (0, None)]))

    async def go():
        client = client_for(handler)
        opened = await client.open("chat/completions", {})
        tally = Tally(3)
        out = [c async for c in stream_events(opened, SseRewriter("glm-5", "r", False, tally), 1.0)]
        await opened.aclose()
        await client.aclose()
        return out, tally

    out, tally = run(go())
    error = json.loads(out[-2][len(b"data: ") :])
    assert (
        set(error["error"]) == {"message", "type", "param", "code"}
        and error["error"]["code"] == "upstream_error"
    )
    assert out[-1] == b"data: [DONE]\n\n" and tally.ended == "error"


def test_non_streaming_rewrite_and_a_bad_body_is_502():
    tally = Tally(5)
    upstream = {"id": "x", "model": "glm_5", "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}  # fmt: skip
    response = rewrite_json(json.dumps(upstream).encode(), "glm-5", "chatcmpl-1", tally)
    body = json.loads(response.body)
    assert body["model"] == "glm-5" and body["id"] == "chatcmpl-1" and body["usage"] == upstream["usage"]
    assert filled(tally).finish_reasons == ["stop"]
    bad = rewrite_json(b"<html>gateway</html>", "glm-5", "r", Tally(5))
    assert bad.status_code == 502 and json.loads(bad.body)["error"]["code"] == "upstream_error"
