"""GLM-4.5 / 4.6 / 4.7 / 5 output parsing: reasoning, content and tool calls, streamed or whole.

The model writes (GLM-4.7 / GLM-5 inline layout; GLM-4.5 / 4.6 put newlines between the tags):

    [<think>]REASONING</think>CONTENT<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

One state machine serves both uses: `parse_full` feeds the whole text at once, a route that streams
calls `feed()` per engine delta. Each feed reads only the new text plus a held-back tail shorter than the
longest tag, so streaming costs time linear in the output length.

Behaviour (the tests in tests/test_parsers*.py pin each point):

* Reasoning: with `starts_in_reasoning` (the prompt pre-opened `<think>`) the output starts as
  reasoning; a repeated `<think>` at its very start is dropped. Otherwise `<think>` opens reasoning only
  before any content. `</think>` ends it, and so does a `<tool_call>` (when tools are parsed): the model
  started a call without closing its reasoning (GLM-5.1 does, behind agents); the late `</think>` of such
  reasoning is then dropped.
  `reasoning` is None when the output has none; with `starts_in_reasoning` it is a string, maybe "".
* Tool calls: whitespace between tags is ignored in either layout, so `fmt` only names the layout the
  template uses; both parse. Values are typed by the request's tool schema (see arguments.py). A call
  with no arguments has arguments "{}". Calls to tools that the request did not declare are kept
  (as vLLM does) unless `drop_unknown_tools` (as SGLang does). A `<tool_call>` with an empty name, or
  with an argument tag before its first `<arg_key>`, is not a call: its text stays content. A key given
  twice keeps its last value. A repeated `</tool_call>` right after a call is dropped. With
  `parse_tools` False (no tools offered, or tool_choice "none") tool-call markup is plain content.
* Content: text before, between and after calls is joined into content (streaming cannot take back text
  it already sent, so text after a call is not dropped). Whitespace-only stretches at the start of the
  content and right after a call are dropped unless more content follows; content that is only
  whitespace is None.
* Streaming never sends a partial tag: text that may be the start of a tag is held until it is resolved.
  A call streams as a header delta (index, id, name) once its name is complete, then argument fragments:
  a string-typed value streams as it is generated, any other value when its `</arg_value>` arrives.
* End of output (`finish()`): a held-back partial tag is released as ordinary text of the block it is
  in. Two unfinished blocks differ between the stream and the final message, as they do in vLLM:
  - an unclosed `<tool_call>`: the final message has no such call and gets the call's text as content;
    if its header was already streamed the stream keeps it (the client sees a cut-off call, as with
    OpenAI's finish_reason "length"); if not, finish() sends the text as content.
  - an unclosed `<think>` that the output opened itself (not `starts_in_reasoning`): the stream has sent
    the text as reasoning; the final message has reasoning None and content "<think>" + the text
    (vLLM's non-streaming GLM-4.5 behaviour).
  In every other case the deltas joined equal `result()` exactly.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from server.parsers.arguments import ToolSchemas
from server.parsers.parsed import DeltaBuilder, ParsedDelta, ParsedMessage, ToolCall
from server.parsers.tags import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, find_tag
from server.parsers.tool_calls import ToolCallReader

FORMATS = ("glm45", "glm47")


class _Mode(Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"


class GlmOutputParser:
    """Splits one choice's GLM output into reasoning, content and tool calls, incrementally.

    Use: `feed(text)` for each new piece of model text, then `finish()` once at the end of generation,
    then `result()` for the whole message. `parse_full(text, ...)` equals feeding all of it at once.
    `tools` is the request's OpenAI tool list (it types the argument values); the module docstring
    gives the exact behaviour.
    """

    def __init__(
        self,
        *,
        tools: list[dict[str, Any]] | None,
        fmt: str = "glm47",
        starts_in_reasoning: bool = False,
        parse_reasoning: bool = True,
        parse_tools: bool = True,
        drop_unknown_tools: bool = False,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown GLM format {fmt!r}; expected one of {FORMATS}")
        self.fmt = fmt
        self._schemas = ToolSchemas(tools)
        self._parse_reasoning = parse_reasoning
        self._parse_tools = parse_tools
        self._drop_unknown_tools = drop_unknown_tools
        self._starts_in_reasoning = starts_in_reasoning and parse_reasoning
        self._mode = _Mode.REASONING if self._starts_in_reasoning else _Mode.CONTENT
        self._held = ""  # the tail that may be the start of a tag
        self._finished = False
        self._out = DeltaBuilder()
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self._calls: list[ToolCall] = []
        self._next_index = 0
        self._call: ToolCallReader | None = None
        self._call_seen = False
        self._reasoning_entered = self._starts_in_reasoning
        self._think_prefix: str | None = None  # leading whitespace + "<think>" when the output opened it
        self._at_gap = True  # at the start of the content or right after a call
        self._gap_text = ""  # whitespace held back at a gap
        self._unclosed_call_text = ""
        self._unclosed_think = False
        self._reasoning_cut = False  # a <tool_call> ended the reasoning before its </think>

    # ---- public API -------------------------------------------------------------------------------

    def feed(self, text: str) -> ParsedDelta:
        """Parse the next piece of model output; return what can be sent to the client now."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._out = DeltaBuilder()
        self._consume(self._held + text)
        return self._out.build()

    def finish(self) -> ParsedDelta:
        """End of generation: release held-back text and settle unfinished blocks (module docstring)."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        self._out = DeltaBuilder()
        held, self._held = self._held, ""
        if self._call is not None:
            self._call.add_raw(held)
            self._settle_unclosed_call(self._call)
        else:
            self._on_text(held)
            self._unclosed_think = self._mode is _Mode.REASONING and self._think_prefix is not None
        self._gap_text = ""
        return self._out.build()

    def result(self) -> ParsedMessage:
        """The whole message; calls finish() first if it has not been called (its delta is then lost)."""
        self.finish()
        reasoning_text = "".join(self._reasoning_parts)
        content_text = "".join(self._content_parts)
        reasoning: str | None = reasoning_text if reasoning_text or self._starts_in_reasoning else None
        if self._unclosed_think:
            content_text = f"{self._think_prefix}{reasoning_text}{content_text}"
            reasoning = None
        content_text += self._unclosed_call_text
        return ParsedMessage(reasoning=reasoning, content=content_text or None, tool_calls=list(self._calls))

    # ---- scanning ---------------------------------------------------------------------------------

    def _consume(self, buffer: str) -> None:
        position = 0
        while True:
            index, tag = find_tag(buffer, position, self._active_tags())
            if tag is None:
                end = len(buffer) if index == -1 else index
                self._on_text(buffer[position:end])
                self._held = buffer[end:]
                return
            self._on_text(buffer[position:index])
            position = index + len(tag)
            self._on_tag(tag)

    def _active_tags(self) -> tuple[str, ...]:
        if self._call is not None:
            return self._call.tags()
        if self._mode is _Mode.REASONING:
            # Only the template's pre-opened <think> may be repeated (and dropped) before any reasoning text;
            # after a <think> the output opened itself, another one is reasoning text.
            repeat_allowed = not self._reasoning_parts and self._think_prefix is None
            tags = (THINK_CLOSE, THINK_OPEN) if repeat_allowed else (THINK_CLOSE,)
            return (*tags, CALL_OPEN) if self._parse_tools else tags
        tags = (CALL_OPEN,) if self._parse_tools else ()
        if self._parse_tools and self._call_seen and self._at_gap:
            tags = (*tags, CALL_CLOSE)  # a repeated </tool_call> right after a call is dropped
        if self._reasoning_cut:
            tags = (*tags, THINK_CLOSE)  # the late </think> of reasoning a call already ended is dropped
        return (*tags, THINK_OPEN) if self._may_open_think() else tags

    def _may_open_think(self) -> bool:
        return (
            self._parse_reasoning
            and not self._reasoning_entered
            and not self._content_parts
            and not self._call_seen
        )

    def _on_text(self, text: str) -> None:
        if not text:
            return
        if self._call is not None:
            self._call.on_text(text, self._out)
        elif self._mode is _Mode.REASONING:
            self._reasoning_parts.append(text)
            self._out.reasoning(text)
        else:
            self._emit_content(text)

    def _on_tag(self, tag: str) -> None:
        if self._call is not None:
            self._call.on_tag(tag, self._out)
            if self._call.done:
                self._end_call(self._call)
        elif self._mode is _Mode.REASONING:
            if tag == THINK_CLOSE:
                self._mode = _Mode.CONTENT
                self._at_gap = True
            elif tag == CALL_OPEN:  # a call before </think> ends the reasoning (as SGLang and vLLM do)
                self._mode = _Mode.CONTENT
                self._at_gap = True
                self._reasoning_cut = True
                self._open_call()
            elif tag != THINK_OPEN or self._reasoning_parts:
                self._on_text(tag)
            # else: a <think> right after the template's pre-opened one; dropped
        elif tag == CALL_OPEN:
            self._open_call()
        elif tag == CALL_CLOSE or (tag == THINK_CLOSE and self._reasoning_cut):
            pass  # dropped: see _active_tags
        elif tag == THINK_OPEN and self._may_open_think():
            self._open_think()
        else:
            self._emit_content(tag)

    # ---- content and reasoning --------------------------------------------------------------------

    def _emit_content(self, text: str) -> None:
        if self._at_gap:
            if text.isspace():
                self._gap_text += text
                return
            text = self._gap_text + text
            self._gap_text = ""
            self._at_gap = False
        self._content_parts.append(text)
        self._out.content(text)

    def _open_think(self) -> None:
        self._think_prefix = self._gap_text + THINK_OPEN
        self._gap_text = ""
        self._reasoning_entered = True
        self._mode = _Mode.REASONING

    # ---- tool calls -------------------------------------------------------------------------------

    def _open_call(self) -> None:
        self._call_seen = True
        self._call = ToolCallReader(
            index=self._next_index,
            schemas=self._schemas,
            drop_unknown_tools=self._drop_unknown_tools,
            text_before=self._gap_text,
        )
        self._gap_text = ""
        self._mode = _Mode.TOOL_CALL

    def _leave_call(self, call: ToolCallReader) -> None:
        self._call = None
        self._mode = _Mode.CONTENT
        if call.header_sent:
            self._next_index += 1

    def _end_call(self, call: ToolCallReader) -> None:
        self._leave_call(call)
        if call.not_a_call:
            self._emit_content(call.raw_text)
            return
        if call.tool_call is not None:
            self._calls.append(call.tool_call)
        self._at_gap = True

    def _settle_unclosed_call(self, call: ToolCallReader) -> None:
        self._leave_call(call)
        if call.header_sent:
            self._unclosed_call_text = call.raw_text
        else:
            self._emit_content(call.raw_text)


def parse_full(
    text: str,
    *,
    tools: list[dict[str, Any]] | None,
    fmt: str = "glm47",
    starts_in_reasoning: bool = False,
    parse_reasoning: bool = True,
    parse_tools: bool = True,
    drop_unknown_tools: bool = False,
) -> ParsedMessage:
    """Parse a whole completion; the same message a GlmOutputParser fed this text in pieces returns."""
    parser = GlmOutputParser(
        tools=tools,
        fmt=fmt,
        starts_in_reasoning=starts_in_reasoning,
        parse_reasoning=parse_reasoning,
        parse_tools=parse_tools,
        drop_unknown_tools=drop_unknown_tools,
    )
    parser.feed(text)
    return parser.result()
