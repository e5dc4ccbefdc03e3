"""Render chat messages (with tools and chat_template_kwargs) into prompt token ids with the model's
own chat template, through tokenizer.apply_chat_template. Input the template cannot render is a 400."""

from __future__ import annotations

import json
from typing import Any

import jinja2

from server.errors import bad_request
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
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise bad_request(
            f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        raise bad_request("The chat template did not render a single prompt.", param="messages")
    return text


def encode_prompt(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
