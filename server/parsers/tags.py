"""GLM markup tags and the scanner that finds them in streamed text without re-reading it."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
KEY_OPEN = "<arg_key>"
KEY_CLOSE = "</arg_key>"
VALUE_OPEN = "<arg_value>"
VALUE_CLOSE = "</arg_value>"

ALL_TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)


def find_tag(text: str, start: int, tags: tuple[str, ...]) -> tuple[int, str | None]:
    """Find the first of `tags` in `text[start:]`.

    Returns (index, tag) for a complete tag; (index, None) when `text[index:]` is an unfinished prefix of
    a tag (the caller holds that tail back until more text arrives); (-1, None) when neither occurs.
    Every tag starts with "<", so only the positions of "<" are examined: the cost is linear in the
    length of `text[start:]`.
    """
    if not tags:
        return -1, None
    longest = max(len(tag) for tag in tags)
    position = text.find("<", start)
    while position != -1:
        window = text[position : position + longest]
        for tag in tags:
            if window.startswith(tag):
                return position, tag
        if len(window) < longest and any(tag.startswith(window) for tag in tags):
            return position, None
        position = text.find("<", position + 1)
    return -1, None
