"""The HTTP front end serving a GLM-5-architecture model (the tiny random checkpoint of `glm-serve
tiny-glm5`) with the GLM chat template and parsers, through the official openai client."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.models.tiny import write_tiny_glm5
from server.engine import NativeEngine
from server.routes.chat_output import GlmProcessor, PassThroughProcessor, make_output_processor
from tests.conftest import http_config

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


@pytest.fixture(scope="module")
def glm_server(tmp_path_factory, loop_thread, make_server):
    model_dir = write_tiny_glm5(tmp_path_factory.mktemp("glm") / "tiny-glm5")
    cfg = http_config().engine
    cfg.model, cfg.num_kv_blocks, cfg.max_model_len = str(model_dir), 64, 512
    engine = NativeEngine(cfg)
    loop_thread.run(engine.start(), timeout=300)
    yield make_server(engine_override=engine)
    loop_thread.run(engine.shutdown(), timeout=60)


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
