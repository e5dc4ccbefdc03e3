"""What the chat template and the rendered prompt tell the parser: the layout and where output starts."""

from __future__ import annotations

import re

from server.parsers.tags import THINK_CLOSE, THINK_OPEN

ASSISTANT_TURN = "<|assistant|>"

# The tool-format instruction in the template's system block: GLM-4.5/4.6 put a newline after the name,
# GLM-4.7/GLM-5 (and the GLM-5.1 variants) do not.
_NEWLINE_INSTRUCTION = re.compile(r"<tool_call>\{function-name\}[ \t]*(?:\n|\\n)")
_INLINE_INSTRUCTION = re.compile(r"<tool_call>\{function-name\}<arg_key>")
# How the template renders past calls: GLM-4.5/4.6 emit '\n<tool_call>' (newline layout).
_NEWLINE_HISTORY_CALL = re.compile(r"""['"]\\n<tool_call>['"]""")


def detect_format(chat_template: str | None) -> str:
    """The tool-call layout a chat template teaches: "glm45" (GLM-4.5/4.6, newlines between tags) or
    "glm47" (GLM-4.7/GLM-5, inline). Unknown or missing templates give "glm47", the current family;
    the parser accepts both layouts either way."""
    if not chat_template:
        return "glm47"
    if _INLINE_INSTRUCTION.search(chat_template):
        return "glm47"
    if _NEWLINE_INSTRUCTION.search(chat_template) or _NEWLINE_HISTORY_CALL.search(chat_template):
        return "glm45"
    return "glm47"


def prompt_starts_in_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt leaves a `<think>` open in the turn being generated.

    GLM-4.7/GLM-5 templates end the generation prompt with `<|assistant|><think>`, so the completion
    starts inside the reasoning block without an opening tag. With thinking disabled they end with
    `</think>`; GLM-4.5/4.6 end with `<|assistant|>` (the model writes `<think>` itself) or
    `<|assistant|>\\n<think></think>`. Only the text after the last `<|assistant|>` is examined, so
    reasoning in earlier turns does not count; a prefilled `<think>partial thought` still does.
    """
    turn_start = prompt_text.rfind(ASSISTANT_TURN)
    tail = prompt_text if turn_start == -1 else prompt_text[turn_start + len(ASSISTANT_TURN) :]
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)
