"""Structured outputs and enforced tool choice on SmolLM2, through the official openai client: every
seeded request at temperature 1.0 must come back valid, not most of them."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.test_http_errors import assert_error, post_chat

SEEDS = range(20)
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


class City(BaseModel):
    name: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)
    coastal: bool
    climate: Literal["cold", "mild", "hot"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture()
def client(server):
    """Twenty requests of up to a few hundred tokens share a CPU: a longer timeout than the suite's."""
    return server.client().with_options(timeout=600)


def _map(fn, items):
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def test_parse_pydantic_model_every_seed(server, client):
    model = server.serving.served_model_name

    def one(seed: int):
        return client.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=City, temperature=1.0, seed=seed, max_tokens=80
        )

    for completion in _map(one, list(SEEDS)):
        assert isinstance(completion.choices[0].message.parsed, City), completion.choices[0].message.content


def test_parse_pydantic_model_streaming_every_seed(server, client):
    model = server.serving.served_model_name

    def one(seed: int) -> City:
        with client.chat.completions.stream(
            model=model, messages=MESSAGES, response_format=City, temperature=1.0, seed=seed, max_tokens=80
        ) as stream:
            for _ in stream:
                pass
            return stream.get_final_completion().choices[0].message.parsed

    assert all(isinstance(parsed, City) for parsed in _map(one, list(SEEDS)))


def test_json_object_is_valid_json_every_seed(server, client):
    model = server.serving.served_model_name

    messages = [{"role": "user", "content": "Reply with a JSON object with the name and age of a person."}]

    def one(seed: int) -> str:
        response = client.chat.completions.create(
            model=model, messages=messages, response_format={"type": "json_object"}, temperature=1.0,
            seed=seed, max_tokens=400,
        )  # fmt: skip
        return response.choices[0].message.content

    for text in _map(one, list(SEEDS)):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
        {"guided_regex": "[0-9]{3}-[a-z]{2}"},
        {"structured_outputs": {"choice": ["yes", "no"]}},
        {"guided_choice": ["yes", "no"]},
        # A bounded integer: an unbounded one lets a sampled run of digits reach max_tokens (invalid JSON).
        {
            "guided_json": {
                "type": "object",
                "properties": {"n": {"type": "integer", "maximum": 999}},
                "required": ["n"],
            }
        },
        {"structured_outputs": {"grammar": 'start: "ab" | "cd"'}},
    ],
)
def test_vllm_structured_output_extras(server, client, extra):
    response = client.chat.completions.create(
        model=server.serving.served_model_name, messages=MESSAGES, temperature=1.0, seed=3, max_tokens=30,
        extra_body=extra,
    )  # fmt: skip
    text = response.choices[0].message.content
    (kind, value), *_ = (
        extra.get("structured_outputs") or {k.removeprefix("guided_"): v for k, v in extra.items()}
    ).items()
    if kind == "regex":
        assert re.fullmatch(value, text), text
    elif kind == "choice":
        assert text in value
    elif kind == "json":
        assert isinstance(json.loads(text)["n"], int)
    else:
        assert text in ("ab", "cd")


def _tool_chat(client, server, seed: int, **kwargs):
    return client.chat.completions.create(
        model=server.serving.served_model_name, messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER, TIME], seed=seed, max_tokens=200, **kwargs,
    )  # fmt: skip


def _check_call(call) -> None:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city", "days"} and isinstance(args["city"], str) and 1 <= args["days"] <= 14
    else:
        assert call.function.name == "get_time" and args == {"zone": args["zone"]}
        assert args["zone"] in ("UTC", "CET", "JST")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_named_and_single(server, client, stream):
    cases = {
        "required": {"tool_choice": "required"},
        "named": {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        "single": {"tool_choice": "required", "parallel_tool_calls": False},
    }
    for name, kwargs in cases.items():
        for seed in range(4):
            calls, finish = _calls(client, server, seed, stream, **kwargs)
            assert calls, (name, seed, finish)
            assert finish == "tool_calls"
            for call in calls:
                _check_call(call)
            if name == "named":
                assert [c.function.name for c in calls] == ["get_time"]
            if name == "single":
                assert len(calls) == 1


def _calls(client, server, seed: int, stream: bool, **kwargs):
    if not stream:
        response = _tool_chat(client, server, seed, **kwargs)
        return response.choices[0].message.tool_calls, response.choices[0].finish_reason
    parts: dict[int, dict] = {}
    finish = None
    for chunk in _tool_chat(client, server, seed, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                slot = parts.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    from openai.types.chat import ChatCompletionMessageToolCall

    calls = [
        ChatCompletionMessageToolCall(
            id=p["id"], type="function", function={"name": p["name"], "arguments": p["arguments"]}
        )
        for _, p in sorted(parts.items())
    ]
    return calls, finish


def test_tool_choice_none_and_auto_without_tool_format_give_content(server, client):
    for choice in ("none", "auto"):
        response = _tool_chat(client, server, 1, tool_choice=choice)
        assert response.choices[0].message.tool_calls is None
        assert response.choices[0].finish_reason in ("stop", "length")
        assert isinstance(response.choices[0].message.content, str)


def test_logit_bias_forces_a_token(server, client):
    response = client.chat.completions.create(
        model=server.serving.served_model_name, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=0,
        logit_bias={"49": 100},
    )  # fmt: skip
    assert response.choices[0].message.content == "A" * 5


def test_reasoning_effort_none_accepted(server, client):
    response = client.chat.completions.create(
        model=server.serving.served_model_name, messages=MESSAGES, max_tokens=2, reasoning_effort="none"
    )
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
    ],
)  # fmt: skip
def test_structured_output_errors_are_400_naming_the_field(server, body, param):
    assert_error(post_chat(server, **body), 400, param=param)


def test_langchain_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    from tests.conftest import API_KEY

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key=API_KEY, model=server.serving.served_model_name,
        seed=0, max_tokens=150, timeout=600, max_retries=0,
    )  # fmt: skip
    for method in ("json_schema", "function_calling"):  # response_format json_schema; a named tool choice
        assert isinstance(llm.with_structured_output(City, method=method).invoke("Describe a city."), City)
    tools = [WEATHER, TIME]
    named = llm.bind_tools(tools, tool_choice="get_time").invoke("Hi")
    assert [c["name"] for c in named.tool_calls] == ["get_time"]
    required = llm.bind_tools(tools, tool_choice="required", parallel_tool_calls=False).invoke("Hi")
    assert len(required.tool_calls) == 1 and required.tool_calls[0]["name"] in ("get_weather", "get_time")


def test_completions_honour_guided_fields(server):
    from tests.test_http_errors import post_completion

    response = post_completion(server, prompt="Code:", max_tokens=12, temperature=1.0, seed=2,
                               guided_regex="[A-Z]{3}-[0-9]{2}")  # fmt: skip
    assert response.status_code == 200, response.text
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", response.json()["choices"][0]["text"])
    assert_error(post_completion(server, guided_regex="("), 400, param="guided_regex")
