"""From generated text to the assistant message: content, reasoning and tool calls.

Each chat choice gets an OutputProcessor: feed(text) -> MessageDelta as text arrives, finish() at the
end. make_output_processor() is the single place where a model-specific parser plugs in; today every
model gets the pass-through (all text is content)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine_api import TokenLogprob
from server.parsers import GlmOutputParser, ParsedDelta, detect_format, prompt_starts_in_reasoning
from server.protocol import (
    AssistantMessage,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
    TopLogprobOut,
)


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
    """GLM's think tags and tool-call markup become reasoning and OpenAI tool calls (server/parsers)."""

    def __init__(self, parser: GlmOutputParser):
        self.parser = parser

    def feed(self, text: str) -> MessageDelta:
        return _message_delta(self.parser.feed(text))

    def finish(self) -> MessageDelta:
        return _message_delta(self.parser.finish())

    def final_message(self) -> AssistantMessage:
        """The whole message as parse_full gives it (a call cut off by max_tokens is content, not a call)."""
        result = self.parser.result()
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in result.tool_calls
        ]
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


def make_output_processor(
    tokenizer: Any,
    prompt_text: str,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    tool_call_parser: str | None = None,
) -> OutputProcessor:
    """The output processor for one chat choice: the GLM parser when the model's chat template is a GLM
    one or a tool-call parser is configured (server.tool_call_parser wins over detection), else all text
    is content."""
    template = getattr(tokenizer, "chat_template", None)
    is_glm = isinstance(template, str) and is_glm_template(template)
    if not is_glm and tool_call_parser is None:
        return PassThroughProcessor()
    parser = GlmOutputParser(
        tools=tools,
        fmt=tool_call_parser or detect_format(template),
        starts_in_reasoning=prompt_starts_in_reasoning(prompt_text),
    )
    return GlmProcessor(parser)


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
