"""An overflowed /v1/messages request sent to the upstream's own Messages API (overflow.anthropic_base_url)
instead of being translated to chat completions: against a small Anthropic-speaking upstream (FakeAnthropic,
a Starlette app on a real socket), with the official SDK as the client, the ledger row, the fallback and
the sovereignty rule. tests/test_routing_http.py uses the same fake as a routing target."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import ServerHandle, start_server
from tests.test_overflow_http import (  # noqa: F401  (deploy and no_unexpected_errors are fixtures)
    REMOTE_MODEL,
    SATURATED,
    SOVEREIGN,
    UPSTREAM_KEY,
    USER,
    deploy,
    no_unexpected_errors,
)
from tests.test_overflow_upstream import filled

TEXT, INPUT_TOKENS, OUTPUT_TOKENS = "Bonjour.", 11, 3


def _event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


class FakeAnthropic:
    """An Anthropic Messages API: records each request (headers, body); answers a message or its event
    stream, or `status` with Anthropic's error body when set."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = 200

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append((dict(request.headers), body))
        if self.status != 200:
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return JSONResponse(error, status_code=self.status)
        message = {"id": "msg_upstream", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS}}  # fmt: skip
        if not body.get("stream"):
            return JSONResponse(message)
        return StreamingResponse(self._events(message), media_type="text/event-stream")

    @staticmethod
    async def _events(message: dict[str, Any]) -> AsyncIterator[bytes]:
        start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": INPUT_TOKENS,
                                                                          "output_tokens": 1}}  # fmt: skip
        yield _event("message_start", message=start)
        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        yield _event("ping")
        for piece in ("Bon", "jour."):
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        yield _event("content_block_stop", index=0)
        yield _event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                     usage={"output_tokens": OUTPUT_TOKENS})  # fmt: skip
        yield _event("message_stop")


@pytest.fixture(scope="module")
def fake_anthropic(loop_thread) -> Iterator[tuple[FakeAnthropic, ServerHandle]]:
    fake = FakeAnthropic()
    handle = start_server(loop_thread, fake.app(), wait_ready=False)
    yield fake, handle
    handle.stop()


def test_messages_overflow_to_the_upstreams_own_messages_api(deploy, fake_anthropic):  # noqa: F811
    fake, upstream = fake_anthropic
    d = deploy(anthropic_base_url=upstream.url)
    d.local_engine.waiting = SATURATED
    client = anthropic.Anthropic(base_url=d.local.url, api_key=USER, max_retries=0, timeout=120)
    request = {"model": "claude-x", "max_tokens": 5, "system": "Be brief.",
               "messages": [{"role": "user", "content": "Say hello in French."}]}  # fmt: skip
    raw = client.messages.with_raw_response.create(**request)
    message = raw.parse()
    assert raw.headers["x-served-by"] == "holysheep" and message.id == raw.headers["x-request-id"]
    assert (message.content[0].text, message.model, message.stop_reason) == (TEXT, "claude-x", "end_turn")
    headers, sent = fake.seen[-1]
    assert sent == {
        **request,
        "model": REMOTE_MODEL,
    }  # as the client sent it: no translation, no extra fields
    assert headers["x-api-key"] == UPSTREAM_KEY and headers["anthropic-version"] == "2023-06-01"

    with client.messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == TEXT and streamed.usage.output_tokens == OUTPUT_TOKENS
    assert streamed.model == "claude-x" and fake.seen[-1][1]["stream"] is True

    d.local.serving.usage.ledger.flush()
    with sqlite3.connect(d.ledger) as db:
        rows = db.execute(
            "SELECT stream, prompt_tokens, completion_tokens, tokens_exact, finish_reason, api FROM usage "
            "WHERE endpoint = '/v1/messages' AND backend = 'holysheep' ORDER BY id"
        ).fetchall()
    assert rows == [(stream, INPUT_TOKENS, OUTPUT_TOKENS, 1, "stop", "messages") for stream in (0, 1)]

    fake.status = 529  # the upstream is overloaded before its first byte: the request falls back to local
    try:
        fallback = client.messages.with_raw_response.create(**request)
    finally:
        fake.status = 200
    assert fallback.headers["x-served-by"] == "local" and fallback.parse().type == "message"
    seen = len(fake.seen)
    sovereign = anthropic.Anthropic(base_url=d.local.url, api_key=SOVEREIGN, max_retries=0, timeout=120)
    assert sovereign.messages.with_raw_response.create(**request).headers["x-served-by"] == "local"
    assert len(fake.seen) == seen  # a sovereign key's request never left the host


def test_the_pass_through_tallies_anthropic_usage_and_keeps_the_upstreams_events():
    import asyncio

    from server.anthropic_upstream import NativeMessages
    from server.errors import APIError
    from server.overflow_upstream import Tally

    async def events() -> bytes:
        return b"".join([chunk async for chunk in FakeAnthropic._events({"id": "msg_up", "model": "up"})])

    raw = asyncio.run(events())
    tally = Tally(local_prompt_tokens=0)
    rewriter = NativeMessages("claude-x").rewriter("glm-5", "msg_local", False, tally)
    out = rewriter.feed(raw[:50]) + rewriter.feed(raw[50:])  # an event split across two chunks
    assert rewriter.done and out.count(b"\n\n") == raw.count(b"\n\n")
    start = json.loads(out.split(b"\n\n")[0].split(b"data: ")[1])
    assert (start["message"]["id"], start["message"]["model"]) == ("msg_local", "claude-x")
    assert out.split(b"\n\n")[1:] == raw.split(b"\n\n")[1:]  # the rest as the upstream sent it
    fields = filled(tally)
    assert (fields.prompt_tokens, fields.completion_tokens, fields.finish_reasons) == (
        11,
        3,
        ["stop"],
    )
    assert fields.tokens_exact and fields.ttft_s >= 0

    broken = Tally(local_prompt_tokens=0)
    rewriter = NativeMessages("claude-x").rewriter("glm-5", "msg_local", False, broken)
    passed = rewriter.feed(_event("error", error={"type": "overloaded_error", "message": "Overloaded"}))
    assert (
        broken.ended == "error" and b"overloaded_error" in passed
    )  # the upstream's error reaches the client
    assert rewriter.failure(APIError(502, "gone"))[0].startswith(b"event: error\n")  # ours, in its shape
    response = NativeMessages("claude-x").rewrite_json(b'{"choices": []}', "glm-5", "msg_local", Tally(0))
    assert response.status_code == 502 and json.loads(response.body)["type"] == "error"  # Anthropic's shape
