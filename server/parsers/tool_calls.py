"""Reading one GLM `<tool_call>` block as it streams: the name, then `<arg_key>`/`<arg_value>` pairs.

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

Whitespace between the tags (the GLM-4.5/4.6 newline layout) is ignored. The reader sends the call's
header (index, id, name) as soon as the name is complete, a string-typed value as it arrives, and any
other value when its `</arg_value>` arrives (it must be complete to be typed). The final arguments are
the JSON of the values by key: the streamed fragments joined, except that a key given twice keeps only
its last value there (the stream, already sent, has both; JSON readers keep the last).
"""

from __future__ import annotations

import json
import uuid
from enum import Enum
from typing import Any

from server.parsers.arguments import ArgumentsWriter, ToolSchemas, coerce_value, is_string_typed
from server.parsers.parsed import DeltaBuilder, ToolCall
from server.parsers.tags import CALL_CLOSE, CALL_OPEN, KEY_CLOSE, KEY_OPEN, VALUE_CLOSE, VALUE_OPEN


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Part(Enum):
    NAME = "name"  # after <tool_call>
    BETWEEN_ARGS = "between_args"
    KEY = "key"
    BEFORE_VALUE = "before_value"  # after </arg_key>
    VALUE = "value"
    SKIPPING = "skipping"  # a call to an undeclared tool, being dropped
    MALFORMED = "malformed"  # an argument tag before the first <arg_key>: not a call
    DONE = "done"


_TAGS: dict[_Part, tuple[str, ...]] = {
    _Part.NAME: (KEY_OPEN, CALL_CLOSE, VALUE_OPEN, VALUE_CLOSE, KEY_CLOSE),
    _Part.BETWEEN_ARGS: (KEY_OPEN, CALL_CLOSE),
    _Part.KEY: (KEY_CLOSE,),
    _Part.BEFORE_VALUE: (VALUE_OPEN, KEY_OPEN, CALL_CLOSE),
    _Part.VALUE: (VALUE_CLOSE,),
    _Part.SKIPPING: (CALL_CLOSE,),
    _Part.MALFORMED: (CALL_CLOSE,),
    _Part.DONE: (),
}


class ToolCallReader:
    """One call, from just after its `<tool_call>` tag to its `</tool_call>`.

    When `done`: `tool_call` is the parsed call, or None when the call was dropped (undeclared tool with
    `drop_unknown_tools`) or is `not_a_call` (empty name: its `raw_text` is content after all).
    `header_sent` tells whether `index` was used in the stream.
    """

    def __init__(
        self, *, index: int, schemas: ToolSchemas, drop_unknown_tools: bool, text_before: str = ""
    ) -> None:
        self.index = index
        self.header_sent = False
        self.not_a_call = False
        self.tool_call: ToolCall | None = None
        self._schemas = schemas
        self._drop_unknown_tools = drop_unknown_tools
        self._part = _Part.NAME
        self._raw = [text_before, CALL_OPEN]
        self._id = ""
        self._name = ""
        self._name_parts: list[str] = []
        self._key_parts: list[str] = []
        self._value_parts: list[str] = []
        self._value_types: frozenset[str] = frozenset()
        self._writer = ArgumentsWriter()
        self._values: dict[str, Any] = {}  # the final arguments; a repeated key keeps its last value

    @property
    def done(self) -> bool:
        return self._part is _Part.DONE

    @property
    def raw_text(self) -> str:
        """The block as generated (with any whitespace that preceded it), for when it is not a call."""
        return "".join(self._raw)

    def tags(self) -> tuple[str, ...]:
        return _TAGS[self._part]

    def add_raw(self, text: str) -> None:
        """Record text that belongs to the block without parsing it (held-back text at the end)."""
        self._raw.append(text)

    def on_text(self, text: str, out: DeltaBuilder) -> None:
        self._raw.append(text)
        if self._part is _Part.NAME:
            self._name_parts.append(text)
        elif self._part is _Part.KEY:
            self._key_parts.append(text)
        elif self._part is _Part.VALUE:
            self._value_parts.append(text)
            if is_string_typed(self._value_types):
                self._emit(ArgumentsWriter.string_piece(text), out)
        # elsewhere: whitespace between tags; anything else there is ignored

    def on_tag(self, tag: str, out: DeltaBuilder) -> None:
        self._raw.append(tag)
        part = self._part
        if part is _Part.NAME:
            self._on_name_end(tag, out)
        elif part is _Part.KEY:
            self._part = _Part.BEFORE_VALUE
        elif part is _Part.VALUE:
            self._on_value_end(out)
        elif part is _Part.SKIPPING:
            self._part = _Part.DONE
        elif part is _Part.MALFORMED:
            self.not_a_call = True
            self._part = _Part.DONE
        elif tag == VALUE_OPEN:
            self._on_value_start(out)
        elif tag == KEY_OPEN:  # a key with no value before it is dropped
            self._start_key()
        else:
            self._close(out)

    def _on_name_end(self, tag: str, out: DeltaBuilder) -> None:
        self._name = "".join(self._name_parts).strip()
        if tag not in (KEY_OPEN, CALL_CLOSE):
            self._part = _Part.MALFORMED
        elif not self._name:
            self.not_a_call = True
            self._part = _Part.DONE
        elif self._drop_unknown_tools and not self._schemas.declares(self._name):
            self._part = _Part.DONE if tag == CALL_CLOSE else _Part.SKIPPING
        else:
            self._id = new_call_id()
            self.header_sent = True
            out.call_header(self.index, self._id, self._name)
            if tag == KEY_OPEN:
                self._start_key()
            else:
                self._close(out)

    def _start_key(self) -> None:
        self._key_parts = []
        self._part = _Part.KEY

    def _on_value_start(self, out: DeltaBuilder) -> None:
        key = "".join(self._key_parts).strip()
        self._values.pop(key, None)  # a repeated key moves to the end, as in the streamed text
        self._value_types = self._schemas.types_of(self._name, key)
        self._value_parts = []
        self._part = _Part.VALUE
        if is_string_typed(self._value_types):
            self._emit(self._writer.key(key) + '"', out)

    def _on_value_end(self, out: DeltaBuilder) -> None:
        key = "".join(self._key_parts).strip()
        if is_string_typed(self._value_types):
            self._emit('"', out)
            self._values[key] = "".join(self._value_parts)
        else:
            value = coerce_value("".join(self._value_parts), self._value_types)
            self._emit(self._writer.key(key) + ArgumentsWriter.value(value), out)
            self._values[key] = value
        self._part = _Part.BETWEEN_ARGS

    def _close(self, out: DeltaBuilder) -> None:
        self._emit(self._writer.close(), out)
        arguments = json.dumps(self._values, ensure_ascii=False)
        self.tool_call = ToolCall(id=self._id, name=self._name, arguments=arguments)
        self._part = _Part.DONE

    def _emit(self, text: str, out: DeltaBuilder) -> None:
        out.call_arguments(self.index, text)
