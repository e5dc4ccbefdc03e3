"""Hand-written cases for server/parsers: streaming shape, held-back tags, typing, edge cases."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.parsers import GlmOutputParser, ParsedDelta, detect_format, parse_full, prompt_starts_in_reasoning
from server.parsers.arguments import coerce_value, schema_types


def tool(name: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": properties}},
    }


WRITE_FILE = tool("write_file", path={"type": "string"}, body={"type": "string"}, mode={"type": "integer"})
WEATHER = tool("get_weather", city={"type": "string"})


def call(name: str, **args: Any) -> str:
    pairs = "".join(f"<arg_key>{key}</arg_key><arg_value>{value}</arg_value>" for key, value in args.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


def feed_all(parser: GlmOutputParser, chunks: list[str]) -> list[ParsedDelta]:
    return [parser.feed(chunk) for chunk in chunks] + [parser.finish()]


# ---- held-back tags ------------------------------------------------------------------------------


def test_partial_tool_call_tag_is_held_until_resolved() -> None:
    parser = GlmOutputParser(tools=[WEATHER])
    first = parser.feed("Hello <tool_")
    assert (first.content, first.tool_calls) == ("Hello ", [])
    second = parser.feed("call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>")
    assert second.content == ""
    assert [(d.name, d.arguments) for d in second.tool_calls] == [("get_weather", '{"city": "Rome"}')]


def test_partial_think_close_is_held_in_reasoning() -> None:
    parser = GlmOutputParser(tools=None, starts_in_reasoning=True)
    assert parser.feed("Plan it</thi").reasoning == "Plan it"
    delta = parser.feed("nk>Answer")
    assert (delta.reasoning, delta.content) == ("", "Answer")


def test_angle_bracket_that_is_not_a_tag_is_released() -> None:
    parser = GlmOutputParser(tools=[WEATHER])
    assert parser.feed("if a <b").content == "if a <b"  # "<b" starts no tag
    assert parser.feed(" and x <t").content == " and x "  # "<t" could start <tool_call>
    assert parser.feed("ea").content == "<tea"


def test_finish_releases_an_unfinished_tag_as_text() -> None:
    parser = GlmOutputParser(tools=[WEATHER])
    assert parser.feed("Bye <tool_").content == "Bye "
    assert parser.finish().content == "<tool_"
    assert parser.result().content == "Bye <tool_"


def test_unclosed_call_whose_header_was_not_sent_becomes_content_in_the_stream_too() -> None:
    parser = GlmOutputParser(tools=[WEATHER])
    deltas = feed_all(parser, ["<tool_call>get_wea"])
    assert "".join(d.content for d in deltas) == "<tool_call>get_wea"
    assert parser.result().content == "<tool_call>get_wea" and parser.result().tool_calls == []


def test_unclosed_call_after_header_is_content_only_in_the_final_message() -> None:
    text = "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Ro"
    parser = GlmOutputParser(tools=[WEATHER])
    deltas = feed_all(parser, [text])
    assert [d.name for delta in deltas for d in delta.tool_calls if d.name] == ["get_weather"]
    message = parser.result()
    assert (message.content, message.tool_calls) == (text, [])


# ---- streaming shape -----------------------------------------------------------------------------


def test_string_argument_streams_before_the_call_closes() -> None:
    parser = GlmOutputParser(tools=[WRITE_FILE])
    head = parser.feed("<tool_call>write_file<arg_key>path</arg_key><arg_value>a.txt</arg_value>")
    assert head.tool_calls[0].name == "write_file"
    assert head.tool_calls[0].arguments == '{"path": "a.txt"'
    body = parser.feed('<arg_key>body</arg_key><arg_value>line "1"\nline 2')
    assert [(d.id, d.arguments) for d in body.tool_calls] == [(None, ', "body": "line \\"1\\"\\nline 2')]
    tail = parser.feed("</arg_value><arg_key>mode</arg_key><arg_value>644</arg_value></tool_call>")
    assert tail.tool_calls[0].arguments == '", "mode": 644}'
    arguments = parser.result().tool_calls[0].arguments
    assert json.loads(arguments) == {"path": "a.txt", "body": 'line "1"\nline 2', "mode": 644}
    assert arguments == head.tool_calls[0].arguments + body.tool_calls[0].arguments + "".join(
        d.arguments for d in tail.tool_calls
    )


def test_zero_argument_call_streams_header_then_empty_object() -> None:
    parser = GlmOutputParser(tools=[tool("now")])
    deltas = feed_all(parser, ["<tool_call>now", "</tool_call>"])
    pieces = [(d.index, d.name, d.arguments) for delta in deltas for d in delta.tool_calls]
    assert pieces == [(0, "now", "{}")]
    assert parser.result().tool_calls[0].arguments == "{}"


def test_parallel_calls_get_their_own_index_and_id() -> None:
    text = call("get_weather", city="Paris") + "\n" + call("get_weather", city="Rome")
    message = parse_full(text, tools=[WEATHER], fmt="glm45")
    assert [json.loads(c.arguments) for c in message.tool_calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert len({c.id for c in message.tool_calls}) == 2
    assert message.content is None  # the newline between calls is not content
    deltas = GlmOutputParser(tools=[WEATHER]).feed(text).tool_calls
    assert [(d.index, d.name, json.loads(d.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_weather", {"city": "Rome"}),
    ]


def test_reasoning_and_content_are_separate_deltas() -> None:
    parser = GlmOutputParser(tools=None, starts_in_reasoning=True)
    delta = parser.feed("think more</think>the answer")
    assert (delta.reasoning, delta.content) == ("think more", "the answer")


# ---- reasoning and content rules ----------------------------------------------------------------


def test_tool_call_inside_unclosed_reasoning_ends_it() -> None:
    """Issue 14 changed this: a <tool_call> before </think> is a call (SGLang's and recent vLLM's GLM
    handling), not reasoning text; the late </think> is dropped."""
    text = "Maybe " + call("get_weather", city="Oslo") + " first.</think>Done."
    message = parse_full(text, tools=[WEATHER], starts_in_reasoning=True)
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert message.reasoning == "Maybe "
    assert message.content == " first.Done."
    unclosed = parse_full(
        "Let me check." + call("get_weather", city="Rome"), tools=[WEATHER], starts_in_reasoning=True
    )
    assert (unclosed.reasoning, unclosed.content, len(unclosed.tool_calls)) == ("Let me check.", None, 1)


def test_text_between_and_after_calls_is_joined_into_content() -> None:
    text = "First." + call("get_weather", city="A") + " Then." + call("get_weather", city="B") + " End."
    message = parse_full(text, tools=[WEATHER])
    assert message.content == "First. Then. End."
    assert len(message.tool_calls) == 2


def test_think_opens_reasoning_only_before_content() -> None:
    message = parse_full("\n<think>why</think>\nbecause <think>x</think>", tools=None, fmt="glm45")
    assert (message.reasoning, message.content) == ("why", "\nbecause <think>x</think>")


def test_glm45_layout_with_thinking_disabled() -> None:
    message = parse_full("<think></think>\nHi there", tools=None, fmt="glm45")
    assert (message.reasoning, message.content) == (None, "\nHi there")


def test_unknown_tools_are_kept_by_default_and_dropped_on_request() -> None:
    text = "Ok." + call("delete_everything", really="true") + call("get_weather", city="Lima")
    kept = parse_full(text, tools=[WEATHER])
    assert [c.name for c in kept.tool_calls] == ["delete_everything", "get_weather"]
    assert json.loads(kept.tool_calls[0].arguments) == {"really": True}
    dropped = parse_full(text, tools=[WEATHER], drop_unknown_tools=True)
    assert [c.name for c in dropped.tool_calls] == ["get_weather"] and dropped.content == "Ok."
    parser = GlmOutputParser(tools=[WEATHER], drop_unknown_tools=True)
    indexes = [d.index for delta in feed_all(parser, list(text)) for d in delta.tool_calls]
    assert set(indexes) == {0}


def test_call_with_empty_name_is_not_a_call() -> None:
    message = parse_full("<tool_call>\n</tool_call> ok", tools=[WEATHER])
    assert (message.content, message.tool_calls) == ("<tool_call>\n</tool_call> ok", [])


def test_parsing_switches() -> None:
    text = "<think>r</think>" + call("get_weather", city="X")
    plain = parse_full(text, tools=[WEATHER], parse_reasoning=False, parse_tools=False)
    assert (plain.reasoning, plain.content, plain.tool_calls) == (None, text, [])
    no_reasoning = parse_full(text, tools=[WEATHER], parse_reasoning=False)
    assert no_reasoning.content == "<think>r</think>" and len(no_reasoning.tool_calls) == 1


def test_misuse_is_reported() -> None:
    with pytest.raises(ValueError):
        GlmOutputParser(tools=None, fmt="glm4")
    parser = GlmOutputParser(tools=None)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("more")
    assert parser.finish().is_empty()


# ---- argument typing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "schema", "expected"),
    [
        ("42", {"type": "integer"}, 42),
        ("4.5", {"type": "number"}, 4.5),
        (" true ", {"type": "boolean"}, True),
        ("False", {"type": "boolean"}, False),
        ("null", {"type": "null"}, None),
        ('{"a": [1, 2]}', {"type": "object"}, {"a": [1, 2]}),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ('[{\\"a\\": \\"b\\"}]', {"type": "array"}, [{"a": "b"}]),
        ("not json", {"type": "array"}, "not json"),
        ("12", {"type": "string"}, "12"),
        (" 12 ", {"type": ["string", "null"]}, " 12 "),
        ("12", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "12"),
        ("12", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 12),
        ("abc", {"type": "integer"}, "abc"),
        ("NaN", {"type": "number"}, "NaN"),
        ("3", {}, 3),
        ("2025-08-01", {}, "2025-08-01"),
        ('"quoted"', {}, "quoted"),
    ],
)
def test_value_typing(raw: str, schema: dict[str, Any], expected: Any) -> None:
    assert coerce_value(raw, schema_types(schema)) == expected


def test_arguments_json_keeps_unicode_and_matches_json_dumps() -> None:
    message = parse_full(call("send", text="你好 🎉", n="3"), tools=[tool("send", text={"type": "string"})])
    assert message.tool_calls[0].arguments == json.dumps({"text": "你好 🎉", "n": 3}, ensure_ascii=False)


# ---- helpers the route uses ----------------------------------------------------------------------


def test_detect_format_without_a_template() -> None:
    assert detect_format(None) == "glm47"
    assert detect_format("{{ messages }}") == "glm47"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|user|>Hi<|assistant|><think>", True),
        ("<|user|>Hi<|assistant|><think>Let me see", True),  # prefilled reasoning
        ("<|user|>Hi<|assistant|></think>", False),
        ("<|user|>\nHi<|assistant|>", False),
        ("<|user|>\nHi<|assistant|>\n<think></think>", False),
        ("<|assistant|><think>old</think>Hi<|user|>Bye<|assistant|>", False),
        ("no chat markup", False),
    ],
)
def test_prompt_starts_in_reasoning(prompt: str, expected: bool) -> None:
    assert prompt_starts_in_reasoning(prompt) is expected


# ---- cost ---------------------------------------------------------------------------------------


def test_streaming_cost_is_linear_in_output_length() -> None:
    """One character per feed over a long output: a parser that re-read the accumulated text would be
    quadratic here (~10^10 steps) and take minutes; a linear one takes about a second."""
    body = "x < y and <b> tags; " * 5_000  # 100k chars, many "<" that start no tag
    text = "<think>" + body + "</think>" + body + "<tool_call>write_file<arg_key>body</arg_key><arg_value>"
    text += body + "</arg_value></tool_call>"
    parser = GlmOutputParser(tools=[WRITE_FILE], fmt="glm45")
    started = time.perf_counter()
    for character in text:
        parser.feed(character)
    message = parser.result()
    assert time.perf_counter() - started < 20
    assert message.reasoning == body and message.content == body
    assert json.loads(message.tool_calls[0].arguments) == {"body": body}


# ---- fuzzing: any text, any chunking -------------------------------------------------------------

PIECES = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "<", "</", "<t", "<tool_", "</thi", "<arg_", "get_weather", "write_file", "city",
    "body", "mode", "7", '{"a": 1}', "[1, 2]", "x y", " ", "\n", "a<b", "你好",
]  # fmt: skip


def stream_view(deltas: list[ParsedDelta]) -> tuple[str, str, dict[int, tuple[str, str]]]:
    calls: dict[int, tuple[str, str]] = {}
    for piece in (d for delta in deltas for d in delta.tool_calls):
        name, arguments = calls.get(piece.index, (piece.name or "", ""))
        calls[piece.index] = (name, arguments + piece.arguments)
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), calls


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=40),
    cuts=st.sets(st.integers(min_value=1, max_value=400)),
    starts_in_reasoning=st.booleans(),
)
def test_any_output_parses_the_same_in_any_chunks(
    pieces: list[str], cuts: set[int], starts_in_reasoning: bool
) -> None:
    text = "".join(pieces)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(text)), len(text)]
    options: dict[str, Any] = {"tools": [WEATHER, WRITE_FILE], "starts_in_reasoning": starts_in_reasoning}
    whole, chunked = GlmOutputParser(**options), GlmOutputParser(**options)
    whole_stream = stream_view(feed_all(whole, [text]))
    chunked_stream = stream_view(feed_all(chunked, [text[a:b] for a, b in pairwise(bounds)]))
    assert chunked_stream == whole_stream
    whole_message, chunked_message = whole.result(), chunked.result()
    assert (chunked_message.reasoning, chunked_message.content) == (
        whole_message.reasoning,
        whole_message.content,
    )
    assert [(c.name, c.arguments) for c in chunked_message.tool_calls] == [
        (c.name, c.arguments) for c in whole_message.tool_calls
    ]
    for tool_call in whole_message.tool_calls:
        assert isinstance(json.loads(tool_call.arguments), dict)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=40), starts_in_reasoning=st.booleans())
def test_stream_equals_message_except_for_the_two_unfinished_blocks(
    pieces: list[str], starts_in_reasoning: bool
) -> None:
    text = "".join(pieces)
    parser = GlmOutputParser(tools=[WEATHER, WRITE_FILE], starts_in_reasoning=starts_in_reasoning)
    reasoning, content, calls = stream_view(feed_all(parser, list(text)))
    message = parser.result()
    final_content = message.content or ""
    final_calls = {i: (c.name, c.arguments) for i, c in enumerate(message.tool_calls)}
    if content == "" and final_content.lstrip().startswith("<think>"):  # unclosed <think>
        assert not starts_in_reasoning and message.reasoning is None and calls == {}
        assert final_content.endswith(reasoning) and text.endswith(final_content)
        return
    assert reasoning == (message.reasoning or "")
    if len(calls) == len(final_calls) + 1:  # unclosed call whose header was sent
        unclosed = final_content[len(content) :]
        assert final_content == content + unclosed and text.endswith(unclosed)
        assert unclosed.lstrip().startswith("<tool_call>")
        del calls[len(final_calls)]
    else:
        assert content == final_content
    assert calls == final_calls


def test_tools_may_be_pydantic_models_or_bare_functions() -> None:
    from pydantic import BaseModel

    class Function(BaseModel):
        name: str
        parameters: dict[str, Any]

    class Tool(BaseModel):
        type: str
        function: Function

    raw = call("f", n="12") + call("g", n="12")
    typed = Tool.model_validate(tool("f", n={"type": "string"}))
    bare = {"name": "g", "parameters": {"type": "object", "properties": {"n": {"type": "string"}}}}
    message = parse_full(raw, tools=[typed, bare])  # type: ignore[list-item]
    assert [json.loads(c.arguments) for c in message.tool_calls] == [{"n": "12"}, {"n": "12"}]


def test_a_think_right_after_the_outputs_own_think_is_reasoning_text() -> None:
    """Found by the property test above: ' <think><think>' (unclosed) lost its second <think> because the
    drop rule for the template's pre-opened <think> also fired after a <think> the output opened itself."""
    parser = GlmOutputParser(tools=[WEATHER], starts_in_reasoning=False)
    reasoning, content, _ = stream_view(feed_all(parser, list(" <think><think>")))
    assert (reasoning, content) == ("<think>", "")
    assert parser.result().content == " <think><think>"
    closed = GlmOutputParser(tools=[WEATHER], starts_in_reasoning=False)
    feed_all(closed, ["<think><think>x</think>answer"])
    assert (closed.result().reasoning, closed.result().content) == ("<think>x", "answer")
    pre_opened = GlmOutputParser(tools=[WEATHER], starts_in_reasoning=True)
    feed_all(pre_opened, ["<think>x</think>answer"])  # the template opened it: the repeat is dropped
    assert (pre_opened.result().reasoning, pre_opened.result().content) == ("x", "answer")


# ---- issue 14: cases that lost or invented tool calls, whole and randomly chunked ------------------


def _parse_chunked(text: str, seed: int, **kwargs: Any) -> tuple[str | None, str, list[tuple[str, Any]], Any]:
    """Stream `text` in random pieces; the streamed reasoning, content and calls, and the final message."""
    import random

    rng = random.Random(seed)
    pieces, position = [], 0
    while position < len(text):
        step = rng.randint(1, 7)
        pieces.append(text[position : position + step])
        position += step
    parser = GlmOutputParser(**kwargs)
    deltas = feed_all(parser, pieces)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for c in d.tool_calls:
            slot = calls.setdefault(c.index, ["", ""])
            slot[0] += c.name or ""
            slot[1] += c.arguments
    streamed = [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return reasoning, content, streamed, parser.result()


ISSUE_CASES = [
    # (text, parser kwargs, expected content, expected calls [(name, arguments)])
    (
        "Let me look." + call("get_weather", city="Oslo"),
        {"tools": [WEATHER], "starts_in_reasoning": True},
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        call("get_weather", city="Oslo"),
        {"tools": None, "parse_tools": False},
        call("get_weather", city="Oslo"),
        [],
    ),
    (
        "<tool_call>f<arg_value>3</arg_value></tool_call>",
        {"tools": [WEATHER]},
        "<tool_call>f<arg_value>3</arg_value></tool_call>",
        [],
    ),
    (
        call("get_weather", city="Oslo") + "</tool_call>",
        {"tools": [WEATHER]},
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        call("get_weather", city="Oslo") + "\n</tool_call>\n" + call("get_weather", city="Rome"),
        {"tools": [WEATHER]},
        None,
        [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})],
    ),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("text", "kwargs", "content", "calls"), ISSUE_CASES)
def test_issue_cases_whole_and_chunked(text, kwargs, content, calls, seed) -> None:
    whole = parse_full(text, **kwargs)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    _, streamed_content, streamed_calls, final = _parse_chunked(text, seed, **kwargs)
    assert streamed_calls == calls and (streamed_content or None) == content
    assert final.content == content


def test_duplicate_argument_keys_keep_the_last_value() -> None:
    text = call("get_weather", city="Oslo", days=1)[: -len("</tool_call>")]
    text += "<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"
    for seed in range(6):
        _, _, streamed, final = _parse_chunked(text, seed, tools=[WEATHER])
        (only,) = final.tool_calls
        assert only.arguments == '{"days": 1, "city": "Rome"}'
        assert streamed == [("get_weather", {"days": 1, "city": "Rome"})]  # JSON readers keep the last key


SCHEMA_TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "$defs": {"Point": {"type": "object"}, "Count": {"type": "integer"}},
            "properties": {
                "point": {"$ref": "#/$defs/Point"},
                "count": {"allOf": [{"$ref": "#/$defs/Count"}]},
                "ratio": {"type": "number"},
                "mode": {"enum": [1, 2]},
                "names": {"type": "array"},
                "flag": {"type": "boolean"},
                "nothing": {"type": "null"},
                "label": {"enum": ["a", "b"]},
            },
        },
    },
}


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("point", "{'x': 1}", {"x": 1}),
        ("count", '"5"', 5),
        ("count", "7", 7),
        ("ratio", '"2.5"', 2.5),
        ("ratio", "'3'", 3.0),
        ("mode", "2", 2),
        ("names", "['a', 'b']", ["a", "b"]),
        ("flag", "True", True),
        ("nothing", "None", None),
        ("label", "a", "a"),
        ("count", "many", "many"),
    ],
)
def test_argument_values_typed_by_schema_with_python_literal_fallback(key, raw, expected) -> None:
    text = call("f", **{key: raw})
    for seed in range(3):
        _, _, streamed, final = _parse_chunked(text, seed, tools=[SCHEMA_TOOL])
        assert json.loads(final.tool_calls[0].arguments) == {key: expected}
        assert streamed == [("f", {key: expected})]


def test_schema_types_follow_ref_allof_and_enum() -> None:
    root = SCHEMA_TOOL["function"]["parameters"]
    props = root["properties"]
    assert schema_types(props["point"], root) == {"object"}
    assert schema_types(props["count"], root) == {"integer"}
    assert schema_types(props["mode"], root) == {"integer"}
    assert schema_types(props["label"], root) == {"string"}
    assert coerce_value("'x'", frozenset({"integer"})) == "x"
