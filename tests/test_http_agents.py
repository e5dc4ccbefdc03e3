"""Agent round trips over /v1/messages and /v1/responses: tool use, continuation, the Agents SDK's Runner,
and overflow. The model is scripted (ScriptedGlm: GLM's tokenizer, chat template and output markup, the
session engine's load and limits), so a tool call is certain; everything from the HTTP body to the GLM
parser and the API's encoder is the server's real path. The tiny random GLM-5 model itself is served in
tests/test_http_agents_glm.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import anthropic
import pytest

from backends.models.tiny import build_glm_tokenizer
from server.engine_api import Delta, GenerateRequest
from server.routes import translated_chat
from tests.conftest import API_KEY, EngineProxy, wait_until
from tests.test_overflow_http import (  # noqa: F401  (deploy and no_unexpected_errors are fixtures)
    LOCAL_MODEL,
    SATURATED,
    USER,
    deploy,
    no_unexpected_errors,
)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
ANSWER = "It is sunny in Paris."
THOUGHT = "The user wants the weather; I should call the tool."


class ScriptedGlm(EngineProxy):
    """Answers a turn that ends in a user message with a GLM tool call, and one that ends in a tool
    response with ANSWER; reasoning first when the prompt opened <think>. Streams a few characters per
    delta. The prompts it was given are kept."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.tokenizer = build_glm_tokenizer()
        self.prompts: list[str] = []
        self.delay_s = 0.0  # between deltas

    def script(self, prompt: str) -> str:
        after_tool = prompt.rfind("<tool_response>") > prompt.rfind("<|user|>")
        text = ANSWER if after_tool else CALL
        return f"{THOUGHT}</think>{text}" if prompt.endswith("<think>") else text

    async def generate(self, request: GenerateRequest) -> Any:
        prompt = self.tokenizer.decode(request.prompt_token_ids)
        self.prompts.append(prompt)
        text = self.script(prompt)
        pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
        produced = 0
        for i, piece in enumerate(pieces):
            ids = self.tokenizer.encode(piece, add_special_tokens=False)
            produced += len(ids)
            last = i == len(pieces) - 1
            yield Delta(
                index=0, text=piece, token_ids=ids, num_prompt_tokens=len(request.prompt_token_ids),
                num_output_tokens=produced, finish_reason="stop" if last else None,
                first_token_time=time.monotonic(),
            )  # fmt: skip
            await asyncio.sleep(self.delay_s)


@pytest.fixture(scope="module")
def scripted(make_server, engine) -> Any:
    model = ScriptedGlm(engine)
    handle = make_server(engine_override=model, api_keys=[API_KEY])
    handle.model = model
    return handle


def anthropic_client(server: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_SCHEMA}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def test_anthropic_tool_use_round_trip_with_thinking(scripted):
    client = anthropic_client(scripted)
    request = dict(
        model="claude-sonnet-4-5", max_tokens=200, messages=[QUESTION], tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 100},
    )  # fmt: skip
    message = client.messages.create(**request)
    assert [b.type for b in message.content] == ["thinking", "tool_use"] and message.stop_reason == "tool_use"
    thinking, call = message.content
    assert thinking.thinking == THOUGHT and thinking.signature
    assert call.name == "get_weather" and call.input == {"city": "Paris", "days": 3}  # typed by the schema
    with client.messages.stream(**request) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == [
        "thinking",
        "tool_use",
    ] and streamed.stop_reason == "tool_use"
    assert streamed.content[0].thinking == THOUGHT and streamed.content[1].input == {
        "city": "Paris",
        "days": 3,
    }
    deltas = {e.delta.type for e in events if e.type == "content_block_delta"}
    assert {"thinking_delta", "signature_delta", "input_json_delta"} <= deltas

    result = {
        "type": "tool_result",
        "tool_use_id": call.id,
        "content": [{"type": "text", "text": "sunny, 21C"}],
    }
    answer = client.messages.create(
        **{**request, "messages": [QUESTION, {"role": "assistant", "content": message.content},
                                   {"role": "user", "content": [result]}]}
    )  # fmt: skip
    assert answer.stop_reason == "end_turn" and answer.content[-1].type == "text"
    assert answer.content[-1].text == ANSWER
    prompt = scripted.model.prompts[-1]
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>" in prompt
    assert "<tool_response>sunny, 21C</tool_response>" in prompt


def test_anthropic_without_thinking_renders_the_switch_off(scripted):
    message = anthropic_client(scripted).messages.create(
        model="claude-x", max_tokens=200, messages=[QUESTION], tools=[ANTHROPIC_TOOL]
    )
    assert [b.type for b in message.content] == ["tool_use"]
    assert scripted.model.prompts[-1].endswith("<|assistant|></think>")


FUNCTION_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                 "parameters": WEATHER_SCHEMA}  # fmt: skip


def test_responses_function_call_then_output_via_previous_response_id(scripted):
    client = scripted.client()
    first = client.responses.create(input="What is the weather in Paris?",
                                    tools=[FUNCTION_TOOL], reasoning={"effort": "medium"})  # fmt: skip
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    assert first.output[0].summary[0].text == THOUGHT
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}
    assert first.usage.output_tokens_details.reasoning_tokens > 0

    second = client.responses.create(
        previous_response_id=first.id, tools=[FUNCTION_TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}],
    )  # fmt: skip
    assert second.output_text == ANSWER and second.status == "completed"
    prompt = scripted.model.prompts[-1]
    assert prompt.count("What is the weather in Paris?") == 1 and "<tool_response>sunny, 21C" in prompt
    assert "<tool_call>get_weather<arg_key>city</arg_key>" in prompt

    model = client.models.list().data[0].id
    with client.responses.stream(model=model, input="Weather?", tools=[FUNCTION_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == arguments == final.output[-1].arguments
    assert json.loads(arguments) == {"city": "Paris", "days": 3}


def test_the_agents_sdk_runner_completes_a_run_with_a_function_tool(scripted):
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[tuple[str, int]] = []

    @function_tool
    def get_weather(city: str, days: int) -> str:
        """Weather for a city."""
        calls.append((city, days))
        return "sunny, 21C"

    model_name = scripted.client().models.list().data[0].id
    model = OpenAIResponsesModel(model=model_name, openai_client=scripted.async_client())
    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model)
    result = Runner.run_sync(agent, "What is the weather in Paris?")
    assert calls == [("Paris", 3)] and result.final_output == ANSWER


def test_a_silent_stream_gets_pings(scripted, monkeypatch):
    monkeypatch.setattr(translated_chat, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(scripted.model, "delay_s", 0.3)
    body = {"model": "claude-x", "max_tokens": 100, "messages": [QUESTION], "stream": True}
    with scripted.http() as http:
        response = http.post("/v1/messages", json=body)
    names = [line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names.count("ping") > 2 and names[-1] == "message_stop"


def test_one_ledger_row_per_request_with_the_counts_the_client_saw(scripted):
    ledger = scripted.serving.usage.ledger
    raw = anthropic_client(scripted).messages.with_raw_response.create(
        model="claude-x", max_tokens=100, messages=[QUESTION]
    )
    message = raw.parse()
    response = scripted.client().responses.create(
        model=scripted.client().models.list().data[0].id, input="Hi"
    )
    rows: dict[str, dict] = {}

    def both_written() -> bool:  # the observer records a request after its response has gone out
        assert ledger.flush()
        with sqlite3.connect(ledger.path) as db:
            db.row_factory = sqlite3.Row
            rows.update((r["request_id"], dict(r)) for r in db.execute("SELECT * FROM usage"))
        return {message.id, response.id} <= rows.keys()

    assert wait_until(both_written), sorted(rows)
    for request_id, endpoint, api, usage in (
        (message.id, "/v1/messages", "messages",
         (message.usage.input_tokens + message.usage.cache_read_input_tokens, message.usage.output_tokens)),
        (response.id, "/v1/responses", "responses", (response.usage.input_tokens, response.usage.output_tokens)),
    ):  # fmt: skip
        row = rows[request_id]
        assert row["endpoint"] == endpoint and row["status"] == 200 and row["backend"] == "local"
        assert (row["prompt_tokens"], row["completion_tokens"]) == usage
        if "api" in row:  # the ledger's api column (issue 18's schema migration)
            assert row["api"] == api
    assert raw.headers["x-request-id"] == message.id


# -- overflow: the upstream answers as chat completions; the client sees its own API ---------------------
def test_overflowed_messages_and_responses_come_back_translated(deploy):  # noqa: F811
    d = deploy()
    d.local_engine.waiting = SATURATED
    client = anthropic.Anthropic(base_url=d.local.url, api_key=USER, max_retries=0, timeout=120)
    raw = client.messages.with_raw_response.create(
        model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "Say hello."}]
    )
    assert raw.headers["x-served-by"] == "holysheep"
    message = raw.parse()
    assert message.type == "message" and message.content[0].text and message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4 and message.model == "claude-x"
    with client.messages.stream(
        model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "Say hello."}]
    ) as stream:
        streamed = stream.get_final_message()
    assert (
        streamed.content[0].text
        and streamed.usage.output_tokens == 4
        and streamed.stop_reason == "max_tokens"
    )

    openai_client = d.local.client(api_key=USER)
    response = openai_client.responses.with_raw_response.create(
        model=LOCAL_MODEL, input="Say hello.", max_output_tokens=4
    )
    assert response.headers["x-served-by"] == "holysheep"
    parsed = response.parse()
    assert parsed.output_text and parsed.usage.output_tokens == 4 and parsed.status == "incomplete"
    assert openai_client.responses.retrieve(parsed.id).output_text == parsed.output_text  # stored too
    with sqlite3.connect(d.ledger) as db:
        d.local.serving.usage.ledger.flush()
        endpoints = [r[0] for r in db.execute("SELECT endpoint FROM usage WHERE backend = 'holysheep'")]
    assert endpoints.count("/v1/messages") == 2 and endpoints.count("/v1/responses") == 1
