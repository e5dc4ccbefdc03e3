"""GLM parsers against the shared upstream data: tool_call_samples.jsonl, the chat templates and the
rendered prompts (see ../shared/data/glm/SOURCES.md). Hand-written behaviour tests live in
test_parsers_behaviour.py.

Choices for the cases where vLLM and SGLang disagree (SOURCES.md, "Parser-specific cases"):

* sglang47_unknown_tool_dropped: by default we keep calls to tools the request did not declare, as vLLM
  does (the vllm45_* samples call `get_current_weather` / `calculate` with only `get_weather` declared
  and expect the calls). SGLang's dropping is available as `drop_unknown_tools=True`; this sample runs
  with it.
* sglang47_array_argument_backslash_escaped_quotes: accepted. For an object/array-typed parameter whose
  value is not JSON, we un-escape one string-escaping layer and retry (arguments.py); a string-typed
  parameter is never touched.
* vllm45_text_between_two_calls (named in SOURCES.md, not in the file) and
  sglang47_text_before_and_after_call: text between and after calls is kept and joined into content,
  as SGLang does. vLLM's non-streaming parser drops it, but a streaming server has already sent that
  text, so dropping it would make the final message disagree with the stream.

Two samples end inside an unfinished block. Their stream and final message differ, as in vLLM (see
server/parsers/glm.py): the final message is what vLLM's non-streaming parser gives (the sample), the
stream is what its streaming parser gives; STREAM_OF_UNFINISHED_SAMPLES checks the stream side.
"""

from __future__ import annotations

import json
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.parsers import (
    GlmOutputParser,
    ParsedDelta,
    ParsedMessage,
    detect_format,
    parse_full,
    prompt_starts_in_reasoning,
)


def _shared_data_dir() -> Path | None:
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glm"
    if beside_repo.is_dir():
        return beside_repo
    from_env = os.environ.get("GLM_SERVE_SHARED_DATA")
    if from_env and Path(from_env).is_dir():
        return Path(from_env)
    return None


DATA_DIR = _shared_data_dir()
MISSING_DATA = (
    "GLM test data not found: expected shared/data/glm beside the repository, "
    "or a directory named by GLM_SERVE_SHARED_DATA"
)
SAMPLE_OPTIONS: dict[str, dict[str, Any]] = {"sglang47_unknown_tool_dropped": {"drop_unknown_tools": True}}
STREAM_OF_UNFINISHED_SAMPLES: dict[str, tuple[str, str, list[str]]] = {  # reasoning, content, call names
    "vllm45_unclosed_tool_call": ("", "", ["get_weather"]),  # the header went out before the cut
    "vllm_glm45_unclosed_think_non_streaming": ("This is a reasoning section", "", []),
}


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    assert DATA_DIR is not None
    with open(DATA_DIR / name, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _params(name: str) -> list[Any]:
    if DATA_DIR is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING_DATA))]
    return [pytest.param(record, id=record["id"]) for record in _read_jsonl(name)]


SAMPLES = _params("tool_call_samples.jsonl")
RENDERED = _params("rendered_prompts.jsonl")


def new_parser(sample: dict[str, Any]) -> GlmOutputParser:
    return GlmOutputParser(
        tools=sample["tools"],
        fmt=sample["format"].removeprefix("reasoning-"),
        starts_in_reasoning=sample["starts_in_reasoning"],
        **SAMPLE_OPTIONS.get(sample["id"], {}),
    )


def parse_sample(sample: dict[str, Any]) -> ParsedMessage:
    return parse_full(
        sample["raw"],
        tools=sample["tools"],
        fmt=sample["format"].removeprefix("reasoning-"),
        starts_in_reasoning=sample["starts_in_reasoning"],
        **SAMPLE_OPTIONS.get(sample["id"], {}),
    )


def calls_of(message: ParsedMessage) -> list[tuple[str, Any]]:
    return [(call.name, json.loads(call.arguments)) for call in message.tool_calls]


def comparable(message: ParsedMessage) -> tuple[Any, ...]:
    """Everything but the random call ids."""
    return message.content, message.reasoning, calls_of(message)


class Stream:
    """What a client reassembles from the deltas, checking their OpenAI shape on the way."""

    def __init__(self) -> None:
        self.reasoning = ""
        self.content = ""
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, delta: ParsedDelta) -> None:
        self.reasoning += delta.reasoning
        self.content += delta.content
        for piece in delta.tool_calls:
            if piece.index not in self.calls:
                assert piece.index == len(self.calls), "call indexes are dense and in order"
                assert piece.id and piece.id.startswith("call_") and piece.name, "first delta names the call"
                self.calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            else:
                assert piece.id is None and piece.name is None, "later deltas carry only arguments"
            self.calls[piece.index]["arguments"] += piece.arguments


def stream_chunks(sample: dict[str, Any], chunks: list[str]) -> tuple[Stream, ParsedMessage]:
    parser, stream = new_parser(sample), Stream()
    for chunk in chunks:
        stream.add(parser.feed(chunk))
    stream.add(parser.finish())
    return stream, parser.result()


def assert_stream_agrees(stream: Stream, message: ParsedMessage, sample_id: str) -> None:
    if sample_id in STREAM_OF_UNFINISHED_SAMPLES:
        names = [call["name"] for call in stream.calls.values()]
        assert (stream.reasoning, stream.content, names) == STREAM_OF_UNFINISHED_SAMPLES[sample_id]
        return
    assert stream.reasoning == (message.reasoning or "")
    assert stream.content == (message.content or "")
    assert [(c["id"], c["name"], c["arguments"]) for c in stream.calls.values()] == [
        (call.id, call.name, call.arguments) for call in message.tool_calls
    ]


def assert_asserted_fields(message: ParsedMessage, sample: dict[str, Any]) -> None:
    expected = sample["expected"]
    expected_calls = [(call["name"], call["arguments"]) for call in expected["tool_calls"]]
    for field in sample["asserted"]:
        if field == "content":
            assert message.content == expected["content"]
        elif field == "reasoning":
            assert message.reasoning == expected["reasoning"]
        elif field == "tool_calls":
            assert calls_of(message) == expected_calls
        elif field == "tool_calls[0].name":
            assert message.tool_calls[0].name == expected_calls[0][0]
        elif field == "content (assertIn only)":
            for part in ("First I'll do this.", "Then I'll do that."):
                assert part in (message.content or "")
        else:
            raise AssertionError(f"unknown asserted field {field!r}")


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_whole_text(sample: dict[str, Any]) -> None:
    message = parse_sample(sample)
    assert_asserted_fields(message, sample)
    # The derived fields hold too: the expected message is matched in full.
    assert comparable(message) == (
        sample["expected"]["content"],
        sample["expected"]["reasoning"],
        [(call["name"], call["arguments"]) for call in sample["expected"]["tool_calls"]],
    )
    for call in message.tool_calls:
        assert call.id.startswith("call_") and len(call.id) == len("call_") + 24


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_streamed_one_character_at_a_time(sample: dict[str, Any]) -> None:
    stream, message = stream_chunks(sample, list(sample["raw"]))
    assert_asserted_fields(message, sample)
    assert comparable(message) == comparable(parse_sample(sample))
    assert_stream_agrees(stream, message, sample["id"])


@pytest.mark.parametrize("sample", SAMPLES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sample_streamed_in_random_chunks(sample: dict[str, Any], data: st.DataObject) -> None:
    raw = sample["raw"]
    cuts = data.draw(st.sets(st.integers(min_value=1, max_value=max(1, len(raw) - 1))), label="cuts")
    bounds = [0, *sorted(cut for cut in cuts if cut < len(raw)), len(raw)]
    chunks = [raw[start:end] for start, end in pairwise(bounds)]
    stream, message = stream_chunks(sample, chunks)
    assert comparable(message) == comparable(parse_sample(sample))
    assert_stream_agrees(stream, message, sample["id"])


@pytest.mark.skipif(DATA_DIR is None, reason=MISSING_DATA)
@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("glm47_flash_chat_template.jinja", "glm47"),
        ("glm47_chat_template.jinja", "glm47"),
        ("glm5_chat_template.jinja", "glm47"),
        ("glm51_chat_template.unverified.jinja", "glm47"),
        ("glm45_46_chat_template.llamacpp.jinja", "glm45"),
    ],
)
def test_detect_format_on_real_templates(template: str, expected: str) -> None:
    assert DATA_DIR is not None
    assert detect_format((DATA_DIR / template).read_text(encoding="utf-8")) == expected


@pytest.mark.parametrize("record", RENDERED)
def test_prompt_starts_in_reasoning_on_rendered_prompts(record: dict[str, Any]) -> None:
    # Only the GLM-4.7/GLM-5 template pre-opens <think>, and only with thinking on.
    expected = (
        record["add_generation_prompt"]
        and record["template"].startswith("glm47")
        and record["template_kwargs"].get("enable_thinking", True)
    )
    assert prompt_starts_in_reasoning(record["rendered"]) is expected


def assistant_turns(record: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Each assistant message with the text the template rendered for it."""
    segments = record["rendered"].split("<|assistant|>")[1:]
    if record["add_generation_prompt"]:
        segments = segments[:-1]
    messages = [m for m in record["messages"] if m["role"] == "assistant"]
    assert len(segments) == len(messages)
    turns = [segment.split("<|observation|>")[0].split("<|user|>")[0] for segment in segments]
    return list(zip(messages, turns, strict=True))


@pytest.mark.parametrize("record", RENDERED)
def test_parse_back_assistant_turns_rendered_by_the_templates(record: dict[str, Any]) -> None:
    """A past assistant turn as the template renders it is model-output grammar: it parses back."""
    assert DATA_DIR is not None
    fmt = detect_format((DATA_DIR / record["template"]).read_text(encoding="utf-8"))
    for message, turn in assistant_turns(record):
        parsed = parse_full(
            turn, tools=record["tools"], fmt=fmt, starts_in_reasoning=not turn.lstrip().startswith("<think>")
        )
        reasoning = message.get("reasoning_content") or ""
        kept_reasoning = reasoning if f"<think>{reasoning}</think>" in turn else ""  # templates drop old ones
        assert (parsed.reasoning or "") == kept_reasoning
        assert (parsed.content or "").strip() == (message.get("content") or "")
        assert calls_of(parsed) == [
            (call["function"]["name"], call["function"]["arguments"])
            for call in message.get("tool_calls", [])
        ]
