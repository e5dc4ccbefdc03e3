"""One streaming request to an OpenAI-compatible endpoint, timed as vLLM's `bench serve` times it.

Timing (perf_counter, seconds from just before the request is sent):
- ttft: the first chunk that carries output (completions: non-empty `text`; chat: non-empty
  `content`, `reasoning_content` or `tool_calls`). A chat server may send the `role` chunk before the
  model has produced anything (ours does); counting it, as vLLM's client does, would flatter such a
  server, so output-free chunks start nothing.
- itl: the gap before each later output chunk (a chunk carrying several tokens is one gap, as in vLLM).
- latency: the last chunk with choices (the finish_reason chunk included); the usage chunk and [DONE]
  are not output.
- output_tokens / prompt_len: the final usage chunk (stream_options.include_usage) when the server sends
  one; otherwise the tokenizer counts the generated text, as vLLM does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.bench.datasets import SampleRequest


@dataclass(slots=True)
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1 path is added)
    model: str  # the name /v1/models lists
    api: str = "completions"  # completions | chat
    api_key: str | None = None
    ignore_eos: bool = False  # a vLLM extension: output lengths exactly max_tokens (ours and vLLM's servers)
    temperature: float | None = 0.0  # None: the server's default
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "chat/completions" if self.api == "chat" else "completions"
        return f"{self.base_url.rstrip('/')}/v1/{path}"

    @property
    def endpoint_type(self) -> str:
        """vLLM's name for the client (its --backend): openai | openai-chat."""
        return "openai-chat" if self.api == "chat" else "openai"


def build_payload(endpoint: Endpoint, request: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": endpoint.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.api == "chat":
        messages = [{"role": "system", "content": request.system}] if request.system else []
        payload["messages"] = [*messages, {"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.expected_output_len
    else:
        payload["prompt"] = (request.system or "") + request.prompt
        payload["max_tokens"] = request.expected_output_len
    if endpoint.temperature is not None:
        payload["temperature"] = endpoint.temperature
    if endpoint.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(endpoint.extra_body)
    return payload


def chunk_output(choice: dict[str, Any]) -> str:
    """The output a stream choice carries ("" for role-only or finish-only chunks)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    text = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    if not text and delta.get("tool_calls"):
        text = json.dumps(delta["tool_calls"])
    return text


class StreamTimer:
    """Folds SSE `data:` payloads into a RequestOutput, stamping each with the clock."""

    def __init__(self, output: RequestOutput, clock: Callable[[], float] = time.perf_counter) -> None:
        self.out = output
        self.clock = clock
        self.last_output_at: float | None = None
        self.last_choice_at: float | None = None
        self.done = False

    def feed(self, data: str) -> None:
        if data == "[DONE]":
            self.done = True
            return
        now = self.clock()
        chunk = json.loads(data)
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            self.out.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return
        choices = chunk.get("choices") or []
        if choices:
            self.last_choice_at = now
            text = chunk_output(choices[0])
            if text:
                if self.last_output_at is None:
                    self.out.ttft = now - self.out.start_time
                else:
                    self.out.itl.append(now - self.last_output_at)
                self.last_output_at = now
                self.out.generated_text += text
        usage = chunk.get("usage")
        if usage:
            self.out.output_tokens = usage.get("completion_tokens") or 0
            self.out.prompt_len = usage.get("prompt_tokens") or self.out.prompt_len

    def finish(self) -> RequestOutput:
        out = self.out
        if self.last_output_at is None and not out.error:
            out.error = "the stream carried no output"
        out.latency = (self.last_choice_at or self.clock()) - out.start_time
        out.success = not out.error
        return out


async def send_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    request: SampleRequest,
    count_tokens: Callable[[str], int] | None = None,
) -> RequestOutput:
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    out = RequestOutput(prompt_len=request.prompt_len)
    timer = StreamTimer(out)
    out.start_time = time.perf_counter()
    try:
        async with client.stream(
            "POST", endpoint.url, json=build_payload(endpoint, request), headers=headers
        ) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                out.error = f"HTTP {r.status_code}: {body[:300]}"
                out.latency = time.perf_counter() - out.start_time
                return out
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    timer.feed(line[5:].strip())
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    timer.finish()
    if out.success and not out.output_tokens:
        out.output_tokens = count_tokens(out.generated_text) if count_tokens else len(out.itl) + 1
    return out
