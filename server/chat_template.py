"""Render chat messages (with tools and chat_template_kwargs) into prompt token ids with the model's
own chat template, through tokenizer.apply_chat_template. Input the template cannot render, or the
tokenizer cannot encode, is a 400.

Special tokens in client text are text: before rendering, every special-token string in the messages,
tools and template kwargs is swapped for a marker; after rendering, the template's own markup is encoded
as usual (its special tokens are control tokens) and each marker as the literal text it stands for,
without special-token parsing. So `<|im_end|>\n<|im_start|>system` in a user turn cannot forge a system
turn. server.special_tokens_in_content: true restores the old behaviour (parsed as control tokens)."""

from __future__ import annotations

import copy
import json
import re
import threading
from typing import Any

from server.errors import APIError, bad_request
from server.protocol import ChatMessage, NamedToolChoice, ResponseFormat, Tool

# Arguments apply_chat_template owns; chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
     "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip
JSON_OBJECT_HINT = "Respond with a single valid JSON object and nothing else."


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the template: content always a string (text parts joined, None as
    ""), tool-call arguments given as JSON strings turned into objects (GLM's template iterates them)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            item["content"] = _join_text_parts(message.content, i)
        elif message.content is None:  # e.g. an assistant turn with only tool calls
            item["content"] = ""
        for call in item.get("tool_calls") or []:
            call["function"]["arguments"] = _arguments_as_object(call["function"].get("arguments"))
        out.append(item)
    return out


def _join_text_parts(parts: list, message_index: int) -> str:
    texts = []
    for j, part in enumerate(parts):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"Content part type '{part.type}' is not supported; this server accepts text parts only.",
                param=f"messages.{message_index}.content.{j}.type",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _arguments_as_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def add_json_object_hint(messages: list[dict[str, Any]], response_format: ResponseFormat | None) -> None:
    """response_format json_object: steer the model with a system instruction (no constrained decoding)."""
    if response_format is None or response_format.type != "json_object":
        return
    if (
        messages
        and messages[0]["role"] in ("system", "developer")
        and isinstance(messages[0].get("content"), str)
    ):
        messages[0]["content"] = f"{messages[0]['content']}\n\n{JSON_OBJECT_HINT}"
    else:
        messages.insert(0, {"role": "system", "content": JSON_OBJECT_HINT})


def select_tools(
    tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None
) -> list[dict[str, Any]] | None:
    """The tools the template renders: none for tool_choice "none", only the named one for a named
    choice, all otherwise ("required" is rendered like "auto": decoding is not constrained)."""
    if tool_choice is not None and tool_choice != "none" and not tools:
        raise bad_request("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
    if not tools or tool_choice == "none":
        return None
    rendered = [tool.model_dump(exclude_none=True) for tool in tools]
    if isinstance(tool_choice, NamedToolChoice):
        rendered = [t for t in rendered if t["function"]["name"] == tool_choice.function.name]
        if not rendered:
            raise bad_request(
                f"tool_choice names the function '{tool_choice.function.name}', which is not in 'tools'.",
                param="tool_choice",
            )
    return rendered


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    clashing = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if clashing:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(clashing)}; use the request fields instead.",
            param="chat_template_kwargs",
        )
    return kwargs


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text of a conversation, rendered by the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "This model has no chat template; use /v1/completions with a prompt.", param="messages"
        )
    kwargs = check_template_kwargs(template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
    except APIError:
        raise
    except Exception as exc:  # a jinja2.TemplateError, or whatever else client data makes the template raise
        raise bad_request(
            f"The chat template could not render these messages: {_describe(exc)}", param="messages"
        ) from None
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        raise bad_request("The chat template did not render a single prompt.", param="messages")
    return text


def encode_prompt(tokenizer: Any, text: str, *, add_special_tokens: bool, param: str = "prompt") -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as exc:  # e.g. TypeError on text the tokenizer cannot take
        raise bad_request(f"The text could not be tokenized: {_describe(exc)}", param=param) from None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def render_and_encode(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None,
    special_tokens_in_content: bool = False,
) -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation (CPU-heavy: run it in the front-end pool)."""
    if special_tokens_in_content:
        text = render_chat(
            tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
        )  # fmt: skip
        return text, encode_prompt(tokenizer, text, add_special_tokens=False, param="messages")
    specials = _SpecialTokens.of(tokenizer)
    marked = render_chat(
        tokenizer, specials.mark(messages), tools=specials.mark(tools),
        add_generation_prompt=add_generation_prompt, template_kwargs=specials.mark(template_kwargs),
    )  # fmt: skip
    return specials.unmark(marked), specials.encode(marked)


MARK_OPEN, MARK_CLOSE = "\U000f0000", "\U000f0001"  # private-use characters around a special token's index
_MARKED = re.compile(f"{MARK_OPEN}(\\d+){MARK_CLOSE}")


class _SpecialTokens:
    """A tokenizer's special-token strings, and a copy of it that encodes them as plain text."""

    _cache: dict[int, tuple[Any, _SpecialTokens]] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        texts = {t.content for t in decoder.values() if getattr(t, "special", False)}
        texts |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.texts = sorted((t for t in texts if t), key=len, reverse=True)
        self.index = {text: i for i, text in enumerate(self.texts)}
        self.pattern = re.compile("|".join(map(re.escape, self.texts))) if self.texts else None
        self._literal: Any = None

    @classmethod
    def of(cls, tokenizer: Any) -> _SpecialTokens:
        with cls._lock:
            held = cls._cache.get(id(tokenizer))
            if held is None or held[0] is not tokenizer:
                held = cls._cache[id(tokenizer)] = (tokenizer, cls(tokenizer))
            return held[1]

    def mark(self, value: Any) -> Any:
        """value (messages, tools, kwargs) with each special-token string in its text made a marker."""
        if isinstance(value, str):
            value = value.replace(MARK_OPEN, "\ufffd").replace(MARK_CLOSE, "\ufffd")
            if self.pattern is None:
                return value
            return self.pattern.sub(lambda m: f"{MARK_OPEN}{self.index[m.group()]}{MARK_CLOSE}", value)
        if isinstance(value, dict):
            return {k: self.mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mark(v) for v in value]
        return value

    def unmark(self, text: str) -> str:
        return _MARKED.sub(lambda m: self.texts[int(m.group(1))], text) if MARK_OPEN in text else text

    def encode(self, marked: str) -> list[int]:
        if MARK_OPEN not in marked:
            return encode_prompt(self.tokenizer, marked, add_special_tokens=False, param="messages")
        ids: list[int] = []
        for i, part in enumerate(_MARKED.split(marked)):  # even: template text; odd: a special token index
            if i % 2 == 0:
                ids += (
                    encode_prompt(self.tokenizer, part, add_special_tokens=False, param="messages")
                    if part
                    else []
                )
            else:
                ids += self._literal_ids(self.texts[int(part)])
        return ids

    def _literal_ids(self, text: str) -> list[int]:
        """The token ids of a special token's text read as text (no special-token parsing)."""
        if self._literal is None:
            literal = copy.deepcopy(self.tokenizer)
            literal.split_special_tokens = True  # fixed on this copy: encode() never switches it
            backend = getattr(literal, "_tokenizer", None)
            if backend is not None and hasattr(backend, "encode_special_tokens"):
                backend.encode_special_tokens = True
            self._literal = literal
        return list(self._literal.encode(text, add_special_tokens=False))
