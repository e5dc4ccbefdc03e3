"""What the GLM output parser hands to the HTTP routes: whole messages and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ToolCall:
    """One complete function call. `arguments` is a JSON object string, e.g. '{"city": "Paris"}'."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of one tool call in the OpenAI streaming shape.

    The first delta of a call carries `id` and `name` (its `arguments` may be ""); later deltas of the
    same `index` carry only argument text. Joining the `arguments` of all deltas of an index gives the
    final arguments JSON of that call.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(slots=True)
class ParsedDelta:
    """New reasoning, content and tool-call pieces produced by one `feed()` or `finish()`."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


@dataclass(slots=True)
class ParsedMessage:
    """The final assistant message: `None` marks a field the output did not have."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


class DeltaBuilder:
    """Collects the pieces of one feed() in order, merging argument text into the previous delta of the
    same call so that a call parsed in one go comes out as one delta."""

    __slots__ = ("_reasoning", "_content", "_calls", "_call_args")

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCallDelta] = []
        self._call_args: list[list[str]] = []

    def reasoning(self, text: str) -> None:
        self._reasoning.append(text)

    def content(self, text: str) -> None:
        self._content.append(text)

    def call_header(self, index: int, call_id: str, name: str) -> None:
        self._calls.append(ToolCallDelta(index=index, id=call_id, name=name, arguments=""))
        self._call_args.append([])

    def call_arguments(self, index: int, text: str) -> None:
        if not self._calls or self._calls[-1].index != index:
            self._calls.append(ToolCallDelta(index=index, id=None, name=None, arguments=""))
            self._call_args.append([])
        self._call_args[-1].append(text)

    def build(self) -> ParsedDelta:
        for delta, parts in zip(self._calls, self._call_args, strict=True):
            delta.arguments = "".join(parts)
        return ParsedDelta(
            reasoning="".join(self._reasoning), content="".join(self._content), tool_calls=self._calls
        )
