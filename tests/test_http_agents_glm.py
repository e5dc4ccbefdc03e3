"""/v1/messages and /v1/responses serving the tiny random GLM-5 (the GLM-5 architecture, tokenizer and chat
template): thinking blocks, reasoning items, the thinking switch and budget, and a forced tool choice."""

from __future__ import annotations

import importlib.util
import json

import anthropic
import pytest

GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    },
}
# A forced tool choice is enforced by constrained decoding (structured outputs, issue 14); without it a
# random model never writes a tool call.
ENFORCED_TOOL_CHOICE = importlib.util.find_spec("server.structured_output") is not None


def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_thinking_blocks_whole_and_streamed(glm_server):
    client = claude(glm_server)
    request = dict(model="claude-opus-4-1", max_tokens=12, messages=QUESTION, extra_body=GREEDY,
                   thinking={"type": "enabled", "budget_tokens": 11})  # fmt: skip
    message = client.messages.create(**request)
    thinking = message.content[0]
    assert thinking.type == "thinking" and thinking.thinking and thinking.signature
    assert "<think>" not in thinking.thinking and "</think>" not in thinking.thinking
    with client.messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]
    assert streamed.usage.output_tokens == message.usage.output_tokens

    off = client.messages.create(**{**request, "thinking": {"type": "disabled"}})
    assert all(block.type != "thinking" for block in off.content)


def test_budget_tokens_closes_the_reasoning_and_the_answer_starts(glm_server):
    client = claude(glm_server)
    request = dict(model="claude-x", max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                   thinking={"type": "enabled", "budget_tokens": 8})  # fmt: skip
    message = client.messages.create(**request)
    kinds = [block.type for block in message.content]
    assert kinds[0] == "thinking" and "text" in kinds, kinds
    # greedy: the capped reasoning is the first 8 tokens the model reasons (the random model never ends it)
    first_eight = client.messages.create(**{**request, "max_tokens": 8, "thinking": {"type": "enabled"}})
    assert message.content[0].thinking == first_eight.content[0].thinking
    assert first_eight.usage.output_tokens == 8 and 8 < message.usage.output_tokens <= 24
    with client.messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]


def test_responses_reasoning_items(glm_server):
    client = glm_server.client()
    model = client.models.list().data[0].id
    response = client.responses.create(model=model, input="What is the capital of France?", max_output_tokens=10,
                                       temperature=0)  # fmt: skip
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= response.usage.output_tokens
    with client.responses.stream(model=model, input="What is the capital of France?", max_output_tokens=10,
                                 temperature=0) as stream:  # fmt: skip
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert deltas == reasoning.summary[0].text
    assert "response.reasoning_summary_part.added" in {e.type for e in events}
    final = events[-1].response
    assert final.output[0].summary[0].text == deltas

    off = client.responses.create(model=model, input="Hi", max_output_tokens=4, reasoning={"effort": "none"})
    assert all(item.type != "reasoning" for item in off.output)


@pytest.mark.skipif(
    not ENFORCED_TOOL_CHOICE, reason="needs enforced tool_choice (issue 14's structured outputs)"
)
def test_forced_tool_use_round_trip_on_the_random_model(glm_server):
    client = claude(glm_server)
    request = dict(model="claude-x", max_tokens=64, messages=QUESTION, tools=[WEATHER],
                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)  # fmt: skip
    message = client.messages.create(**request)
    assert message.stop_reason == "tool_use"
    call = next(block for block in message.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict)
    result = {"type": "tool_result", "tool_use_id": call.id, "content": json.dumps({"forecast": "sunny"})}
    history = [
        *QUESTION,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": [result]},
    ]
    answer = client.messages.create(**{**request, "messages": history, "tool_choice": {"type": "none"}})
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content
