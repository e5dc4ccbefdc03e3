"""The HTTP front end serving a GLM-5-architecture model (the tiny random checkpoint of `glm-serve
tiny-glm5`) with the GLM chat template and parsers, through the official openai client."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.routes.chat_output import GlmProcessor, PassThroughProcessor, make_output_processor

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glm" / "tool_call_samples.jsonl"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


def test_glm_chat_reasoning_whole_and_streamed(glm_server):
    client = glm_server.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    message = whole.choices[0].message
    # The GLM-5 template pre-opens <think>: the completion starts inside reasoning.
    reasoning = message.model_extra.get("reasoning_content")
    assert isinstance(reasoning, str) and message.model_extra.get("reasoning") == reasoning
    assert "<think>" not in (message.content or "") and "</think>" not in reasoning
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    streamed_reasoning, streamed_content = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            streamed_reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            streamed_content += choice.delta.content or ""
    assert streamed_reasoning == reasoning
    assert streamed_content == (message.content or "")


def test_glm_tools_and_thinking_switch_reach_the_template(glm_server):
    client = glm_server.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    with_tools = client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, temperature=0, tools=[WEATHER_TOOL]
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tool schema was rendered
    no_think = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert no_think.choices[0].message.model_extra.get("reasoning_content") is None


def test_output_processor_choice_and_tool_calls():
    glm = SimpleNamespace(chat_template="[gMASK]<sop>{{ '<|assistant|>' }}<tool_call><arg_key>")
    other = SimpleNamespace(chat_template="{{ '<|im_start|>' }}")
    assert isinstance(make_output_processor(other, "x", None), PassThroughProcessor)
    samples = [json.loads(line) for line in SAMPLES.read_text().splitlines()] if SAMPLES.exists() else []
    sample = next((s for s in samples if s["id"] == "vllm45_single_tool_call"), None)
    if sample is None:
        pytest.skip(f"shared GLM samples not found at {SAMPLES}")
    processor = make_output_processor(glm, "<|assistant|>", sample["tools"])
    assert isinstance(processor, GlmProcessor)
    deltas = [processor.feed(ch) for ch in sample["raw"]] + [processor.finish()]
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].function.name == "get_current_weather" and calls[0].id
    args = "".join(c.function.arguments or "" for c in calls)
    assert json.loads(args) == sample["expected"]["tool_calls"][0]["arguments"]
    final = processor.final_message()
    assert final.content is None and json.loads(final.tool_calls[0].function.arguments) == json.loads(args)


# ---- issue 14: forced tool choice and structured outputs on random weights --------------------------
# Random weights make unconstrained output garbage: a valid call or valid JSON shows the constraint works.
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "maximum": 9},
            },
            "required": ["city"],
        },
    },
}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def _glm_tool_chat(client, seed: int, stream: bool = False, **kwargs):
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], tools=[CITY_TOOL, TIME_TOOL],
        temperature=1.0, seed=seed, max_tokens=24, stream=stream, **kwargs,
    )  # fmt: skip


def _valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_time":
        return args in ({"zone": "UTC"}, {"zone": "CET"})
    return name == "get_weather" and set(args) <= {"city", "days"} and isinstance(args.get("days", 0), int)


@pytest.mark.parametrize(
    ("tool_choice", "parallel"),
    [("required", None), ("required", False), ({"type": "function", "function": {"name": "get_time"}}, None)],
)
def test_glm_forced_tool_choice_yields_valid_calls(glm_server, tool_choice, parallel):
    client = glm_server.client()
    extra = {"parallel_tool_calls": parallel} if parallel is not None else {}
    for seed in range(3):
        response = _glm_tool_chat(client, seed, tool_choice=tool_choice, extra_body=NO_THINKING, **extra)
        choice = response.choices[0]
        calls = choice.message.tool_calls or []
        assert calls, choice.message
        # "required" allows more calls: one may be cut off by max_tokens after the complete ones
        assert choice.finish_reason == "tool_calls" or (tool_choice == "required" and parallel is None)
        assert all(_valid_call(c.function.name, c.function.arguments) for c in calls)
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in calls] == ["get_time"]
        if parallel is False:
            assert len(calls) == 1


def test_glm_named_choice_streams_the_call(glm_server):
    client = glm_server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(_glm_tool_chat(client, 4, stream=True, tool_choice=named, extra_body=NO_THINKING))
    calls = [c for chunk in chunks for ch in chunk.choices for c in (ch.delta.tool_calls or [])]
    assert calls[0].function.name == "get_time" and calls[0].id
    assert _valid_call("get_time", "".join(c.function.arguments or "" for c in calls))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_glm_tool_choice_none_and_no_tools_never_call(glm_server):
    client = glm_server.client()
    model = client.models.list().data[0].id
    for seed in range(3):
        none = _glm_tool_chat(client, seed, tool_choice="none")
        plain = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=seed, max_tokens=40,
            logit_bias={str(glm_server.serving.engine.tokenizer.convert_tokens_to_ids("<tool_call>")): 5},
        )  # fmt: skip
        for response in (none, plain):
            assert response.choices[0].message.tool_calls is None
            assert response.choices[0].finish_reason != "tool_calls"


def test_glm_json_schema_after_reasoning(glm_server):
    """Thinking on: the model reasons freely, then </think> opens the constrained part (logit_bias makes
    these random weights close their reasoning at once)."""
    client = glm_server.client()
    model = client.models.list().data[0].id
    think_close = glm_server.serving.engine.tokenizer.convert_tokens_to_ids("</think>")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    for seed in range(3):
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A number?"}], temperature=1.0, seed=seed,
            max_tokens=40, logit_bias={str(think_close): 100},
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )  # fmt: skip
        message = response.choices[0].message
        assert message.model_extra.get("reasoning_content") == ""
        assert response.choices[0].finish_reason == "stop", message
        assert isinstance(json.loads(message.content)["n"], int)
