"""From generated text to the assistant message: content, reasoning and tool calls.

Each chat choice gets an OutputProcessor: feed(text) -> MessageDelta as text arrives, finish() at the
end. make_output_processor() is the single place where a model-specific parser plugs in: GLM templates
get the GLM parser; a call forced in the JSON form (other models, server/structured_output_tools.py)
is read back as tool calls; otherwise all text is content."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine_api import TokenLogprob
from server.parsers import GlmOutputParser, ParsedDelta, detect_format, prompt_starts_in_reasoning
from server.parsers.tool_calls import new_call_id
from server.protocol import (
    AssistantMessage,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
    TopLogprobOut,
)
from server.routes.chat_constraints import OutputPlan


@dataclass(slots=True)
class MessageDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.content or self.reasoning_content or self.tool_calls)

    def merge(self, other: MessageDelta) -> MessageDelta:
        return MessageDelta(
            self.content + other.content, self.reasoning_content + other.reasoning_content,
            self.tool_calls + other.tool_calls,
        )  # fmt: skip

    def to_stream_delta(self) -> dict[str, Any]:
        """The chunk's delta object: only the keys this delta sets, as OpenAI's chunks have it."""
        delta: dict[str, Any] = {}
        if self.content:
            delta["content"] = self.content
        if self.reasoning_content:
            delta["reasoning_content"] = delta["reasoning"] = self.reasoning_content
        if self.tool_calls:
            delta["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return delta


class OutputProcessor(Protocol):
    def feed(self, text: str) -> MessageDelta: ...

    def finish(self) -> MessageDelta: ...


class PassThroughProcessor:
    """All generated text is content."""

    def feed(self, text: str) -> MessageDelta:
        return MessageDelta(content=text)

    def finish(self) -> MessageDelta:
        return MessageDelta()


class GlmProcessor:
    """GLM's think tags and tool-call markup become reasoning and OpenAI tool calls (server/parsers).
    `single_call` (parallel_tool_calls false): calls after the first are dropped."""

    def __init__(self, parser: GlmOutputParser, single_call: bool = False):
        self.parser = parser
        self.max_calls = 1 if single_call else None

    def feed(self, text: str) -> MessageDelta:
        return self._limited(_message_delta(self.parser.feed(text)))

    def finish(self) -> MessageDelta:
        return self._limited(_message_delta(self.parser.finish()))

    def _limited(self, delta: MessageDelta) -> MessageDelta:
        if self.max_calls is not None:
            delta.tool_calls = [c for c in delta.tool_calls if c.index < self.max_calls]
        return delta

    def final_message(self) -> AssistantMessage:
        """The whole message as parse_full gives it (a call cut off by max_tokens is content, not a call)."""
        result = self.parser.result()
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in result.tool_calls
        ][: self.max_calls]
        return AssistantMessage(
            content=result.content if result.content or not calls else None,
            reasoning_content=result.reasoning,
            reasoning=result.reasoning,
            tool_calls=calls or None,
        )


def _message_delta(parsed: ParsedDelta) -> MessageDelta:
    calls = [delta_tool_call(c.index, c.id, c.name, c.arguments) for c in parsed.tool_calls]
    return MessageDelta(content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls)


def is_glm_template(chat_template: str | None) -> bool:
    return bool(chat_template) and "[gMASK]" in chat_template and "<|assistant|>" in chat_template


class NamedCallProcessor:
    """A named tool choice in the JSON form: the output is the call's arguments object, streamed as the
    arguments of call 0 (its header goes with the first text)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.call_id = new_call_id()
        self.parts: list[str] = []

    def feed(self, text: str) -> MessageDelta:
        first = not self.parts
        self.parts.append(text)
        if not first and not text:
            return MessageDelta()
        header = (self.call_id, self.name) if first else (None, None)
        return MessageDelta(tool_calls=[delta_tool_call(0, *header, text)])

    def finish(self) -> MessageDelta:
        return MessageDelta() if self.parts else self.feed("")

    def final_message(self) -> AssistantMessage:
        call = ToolCallOut(
            id=self.call_id, function=FunctionCallOut(name=self.name, arguments="".join(self.parts))
        )
        return AssistantMessage(content=None, tool_calls=[call])


class RequiredCallsProcessor:
    """tool_choice "required" in the JSON form: the output is a JSON array of {"name", "parameters"};
    its calls are sent when the array is complete. Output that is not such an array (cut off by
    max_tokens) is content."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: list[ToolCallOut] | None = None

    def feed(self, text: str) -> MessageDelta:
        self.parts.append(text)
        return MessageDelta()

    def finish(self) -> MessageDelta:
        self.calls = _json_calls("".join(self.parts))
        if self.calls is None:
            return MessageDelta(content="".join(self.parts))
        return MessageDelta(
            tool_calls=[
                delta_tool_call(i, c.id, c.function.name, c.function.arguments)
                for i, c in enumerate(self.calls)
            ]
        )

    def final_message(self) -> AssistantMessage:
        if self.calls is None:
            self.calls = _json_calls("".join(self.parts))
        if self.calls is None:
            return AssistantMessage(content="".join(self.parts))
        return AssistantMessage(content=None, tool_calls=self.calls)


def _json_calls(text: str) -> list[ToolCallOut] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
    ):
        return None
    return [
        ToolCallOut(
            id=new_call_id(),
            function=FunctionCallOut(
                name=item["name"], arguments=json.dumps(item.get("parameters") or {}, ensure_ascii=False)
            ),
        )
        for item in items
    ]


def glm_format_of(tokenizer: Any) -> str | None:
    """The GLM tool-call layout of the model's chat template; None for a model without a known tool format."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not is_glm_template(template):
        return None
    return detect_format(template)


def make_output_processor(
    tokenizer: Any,
    prompt_text: str,
    tools: list[dict[str, Any]] | None,
    plan: OutputPlan | None = None,
    tool_call_parser: str | None = None,
) -> OutputProcessor:
    """The output processor for one chat choice: the GLM parser when the model's chat template is a GLM
    one (tool-call syntax is parsed only when `tools` were offered), the JSON form of a forced call on
    other models, else all text is content. `plan`: server/routes/chat_constraints.py; by default no
    constraint and tool_choice "auto". A configured `tool_call_parser` (server.tool_call_parser) wins over
    detection."""
    plan = plan or OutputPlan(structured=None, parse_tools=tools is not None)
    fmt = tool_call_parser or glm_format_of(tokenizer)
    if fmt is None:
        if plan.json_calls == "named":
            return NamedCallProcessor(plan.forced_name)
        if plan.json_calls == "required":
            return RequiredCallsProcessor()
        return PassThroughProcessor()
    parser = GlmOutputParser(
        tools=tools,
        fmt=fmt,
        starts_in_reasoning=prompt_starts_in_reasoning(prompt_text),
        parse_tools=plan.parse_tools,
    )
    return GlmProcessor(parser, single_call=plan.single_call)


class MessageAccumulator:
    """Gathers one choice's MessageDeltas into the final assistant message (non-streaming responses)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, delta: MessageDelta) -> None:
        if delta.content:
            self.content.append(delta.content)
        if delta.reasoning_content:
            self.reasoning.append(delta.reasoning_content)
        for call in delta.tool_calls:
            slot = self.calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = call.id or slot["id"]
            if call.function is not None:
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def message(self) -> AssistantMessage:
        tool_calls = [
            ToolCallOut(
                id=c["id"] or f"call_{i}", function=FunctionCallOut(name=c["name"], arguments=c["arguments"])
            )
            for i, c in sorted(self.calls.items())
        ]
        reasoning = "".join(self.reasoning) or None
        return AssistantMessage(
            content="".join(self.content) if self.content or not tool_calls else None,
            reasoning_content=reasoning,
            reasoning=reasoning,
            tool_calls=tool_calls or None,
        )


def delta_tool_call(
    index: int, call_id: str | None, name: str | None, arguments: str | None
) -> DeltaToolCall:
    """Helper for parsers: one streamed tool-call fragment."""
    return DeltaToolCall(
        index=index, id=call_id, type="function" if call_id else None,
        function=DeltaFunctionCall(name=name, arguments=arguments),
    )  # fmt: skip


def chat_logprobs(entries: list[TokenLogprob], top_n: int) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=list(e.token.encode("utf-8")),
            top_logprobs=[
                TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode("utf-8")))
                for t in e.top[:top_n]
            ],
        )  # fmt: skip
        for e in entries
    ]
