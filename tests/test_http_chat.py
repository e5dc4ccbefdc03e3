"""/v1/chat/completions through a real uvicorn server and the official openai client.

Engine-agnostic: outputs are never hard-coded; the tests check shapes, counts, finish reasons,
determinism, and that streamed and non-streamed results agree."""

from __future__ import annotations

import json
import warnings

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
LONG = {"ignore_eos": True}  # vLLM extra: run to max_tokens, so "length" is certain on any engine


def chat(client, server, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=server.serving.served_model_name, **kwargs)


def stream_chat(client, server, **kwargs):
    return list(chat(client, server, stream=True, **kwargs))


def prompt_token_count(server, messages=MESSAGES, **extra) -> int:
    with server.http() as http:
        response = http.post("/tokenize", json={"messages": messages, **extra})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def streamed_content(chunks, index: int = 0) -> str:
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index
    )


def test_plain_chat_completion(server, client):
    response = chat(client, server, max_tokens=8, extra_body=LONG)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == server.serving.served_model_name
    assert isinstance(response.created, int)
    (choice,) = response.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens == prompt_token_count(server)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


def test_response_json_validates_against_openai_types(server):
    """Strict validation (not the client's lenient construct) of the raw JSON, stream included."""
    body = {"model": server.serving.served_model_name, "messages": MESSAGES, "max_tokens": 5, "logprobs": True,
            "top_logprobs": 2}  # fmt: skip
    with server.http() as http:
        ChatCompletion.model_validate(http.post("/v1/chat/completions", json=body).json())
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(event))


def test_client_parses_without_warnings(server, client):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = chat(client, server, max_tokens=4, logprobs=True, top_logprobs=1)
        response.model_dump()
        for chunk in chat(client, server, max_tokens=4, stream=True, stream_options={"include_usage": True}):
            chunk.model_dump()


def test_streaming_chunks_follow_openai_order(server, client):
    chunks = stream_chat(client, server, max_tokens=6, extra_body=LONG)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert all(c.usage is None for c in chunks)


def test_include_usage_final_chunk(server, client):
    chunks = stream_chat(
        client, server, max_tokens=7, stream_options={"include_usage": True}, extra_body=LONG
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    assert last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens == prompt_token_count(server)
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7


def test_stream_and_non_stream_agree(server, client):
    common = dict(max_tokens=12, temperature=0.8, seed=1234)
    full = chat(client, server, **common)
    chunks = stream_chat(client, server, stream_options={"include_usage": True}, **common)
    assert streamed_content(chunks) == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices(server, client):
    response = chat(client, server, n=2, max_tokens=5, temperature=1.0, extra_body=LONG)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 10
    assert response.usage.prompt_tokens == prompt_token_count(server)

    chunks = stream_chat(
        client, server, n=2, max_tokens=5, stream_options={"include_usage": True}, extra_body=LONG
    )
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in mine if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_seed_reproducible(server, client):
    first = chat(client, server, max_tokens=16, temperature=1.0, seed=42)
    second = chat(client, server, max_tokens=16, temperature=1.0, seed=42)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage == second.usage


def test_stop_strings_cut_the_output(server, client):
    """Find a stop string in a greedy output, then ask again with it: the output ends just before it."""
    full = chat(client, server, max_tokens=40, temperature=0, extra_body=LONG).choices[0].message.content
    candidates = [
        full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip() == full[i : i + 3]
    ]
    assert candidates, f"greedy output too short to pick a stop string: {full!r}"
    stop = candidates[0]
    for form in (stop, [stop, "\u2603never\u2603"]):
        response = chat(client, server, max_tokens=40, temperature=0, stop=form, extra_body=LONG)
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content == full[: full.find(stop)]
    chunks = stream_chat(client, server, max_tokens=40, temperature=0, stop=stop, extra_body=LONG)
    assert streamed_content(chunks) == full[: full.find(stop)]


def test_logprobs(server, client):
    response = chat(client, server, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=LONG)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 6
    for entry in entries:
        assert entry.logprob <= 0 and isinstance(entry.token, str)
        assert entry.bytes == list(entry.token.encode())
        assert 1 <= len(entry.top_logprobs) <= 3
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    plain = chat(client, server, max_tokens=3, logprobs=True, extra_body=LONG).choices[0].logprobs.content
    assert len(plain) == 3 and all(e.top_logprobs == [] for e in plain)
    assert chat(client, server, max_tokens=3).choices[0].logprobs is None

    chunks = stream_chat(client, server, max_tokens=6, logprobs=True, top_logprobs=2, extra_body=LONG)
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(streamed) == 6


def test_max_completion_tokens_wins(server, client):
    response = chat(client, server, max_tokens=10, max_completion_tokens=3, extra_body=LONG)
    assert response.usage.completion_tokens == 3


def test_default_max_tokens_fills_the_context(server, client):
    """Without max_tokens the budget is max_model_len - prompt: a request that fits is accepted."""
    response = chat(client, server, temperature=0, stop=[" "])
    assert response.choices[0].finish_reason in ("stop", "length")


def test_content_parts_equal_plain_string(server, client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three colours"},
                                          {"type": "text", "text": "of the rainbow."}]}]  # fmt: skip
    joined = [{"role": "user", "content": "Name three colours\nof the rainbow."}]
    a = chat(client, server, messages=parts, max_tokens=2)
    b = chat(client, server, messages=joined, max_tokens=2)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == prompt_token_count(server, joined)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


def test_tools_are_rendered_by_the_template(server, client):
    with_tools = chat(client, server, max_tokens=2, tools=TOOLS)
    assert with_tools.usage.prompt_tokens == prompt_token_count(server, tools=TOOLS)
    no_tools = chat(client, server, max_tokens=2, tools=TOOLS, tool_choice="none")
    assert no_tools.usage.prompt_tokens == prompt_token_count(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat(client, server, max_tokens=2, tools=TOOLS, tool_choice=named).usage.prompt_tokens == (
        with_tools.usage.prompt_tokens
    )


def test_assistant_tool_call_history_renders(server, client):
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    response = chat(client, server, messages=messages, tools=TOOLS, max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_template_kwargs_and_response_format(server, client):
    kwargs = {"enable_thinking": False}
    response = chat(client, server, max_tokens=2, extra_body={"chat_template_kwargs": kwargs})
    assert response.usage.prompt_tokens == prompt_token_count(server, chat_template_kwargs=kwargs)
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    plain = chat(client, server, messages=messages, max_tokens=2)
    as_json = chat(client, server, messages=messages, max_tokens=2, response_format={"type": "json_object"})
    assert as_json.usage.prompt_tokens > plain.usage.prompt_tokens  # the JSON instruction was added
    as_text = chat(client, server, messages=messages, max_tokens=2, response_format={"type": "text"})
    assert as_text.usage.prompt_tokens == plain.usage.prompt_tokens


def test_extras_and_unknown_fields_accepted(server, client):
    response = chat(
        client, server, max_tokens=4, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, user="u-1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [0], "no_such_field": {"x": 1}},
    )  # fmt: skip
    assert response.usage.completion_tokens >= 2


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_roles(server, client, role):
    messages = [{"role": role, "content": "Be brief."}, *MESSAGES]
    assert chat(client, server, messages=messages, max_tokens=2).usage.prompt_tokens == prompt_token_count(
        server, messages
    )


def test_raw_sse_framing(server):
    body = {"model": server.serving.served_model_name, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
