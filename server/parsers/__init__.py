"""GLM reasoning and tool-call parsing for the HTTP routes, for whole completions and streaming deltas.

Typical use in a route:

    fmt = detect_format(tokenizer.chat_template)
    parser = GlmOutputParser(tools=request.tools, fmt=fmt,
                             starts_in_reasoning=prompt_starts_in_reasoning(prompt_text))
    for text in engine_deltas:
        delta = parser.feed(text)      # ParsedDelta: reasoning / content / tool_calls pieces
    last = parser.finish()             # release held-back text at the end of generation
    message = parser.result()          # ParsedMessage, == parse_full(whole_text, ...)
"""

from server.parsers.detect import detect_format, prompt_starts_in_reasoning
from server.parsers.glm import FORMATS, GlmOutputParser, parse_full
from server.parsers.parsed import ParsedDelta, ParsedMessage, ToolCall, ToolCallDelta

__all__ = [
    "FORMATS",
    "GlmOutputParser",
    "ParsedDelta",
    "ParsedMessage",
    "ToolCall",
    "ToolCallDelta",
    "detect_format",
    "parse_full",
    "prompt_starts_in_reasoning",
]
