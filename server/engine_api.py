"""What the HTTP front end sees of an engine. NativeEngine (server/engine.py) and VllmEngine implement it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.scheduler.request import SamplingParams


class EngineError(Exception):
    """A request the engine cannot serve (bad input it detected, or a request that can never fit)."""


class EngineDeadError(Exception):
    """The engine loop died; the server should report unhealthy."""


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int = 1
    arrival_time: float = 0.0  # time.monotonic() at arrival
    client: str = ""  # who asked (routes/deps.py client_of); empty: this request alone


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Delta:
    """New output of one choice since the previous delta of that choice."""

    index: int
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative, this choice
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last delta
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    first_token_time: float | None = None  # monotonic time of the first output token of this choice
    scheduled_time: float | None = None  # monotonic time this choice was first scheduled (end of queueing)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class Load:
    num_running: int
    num_waiting: int  # sequences (one per prompt and choice) not yet scheduled
    kv_usage: float  # 0..1
    est_wait_s: float  # estimated queueing delay for a new request, from recent throughput
    gen_tokens_per_s: float  # recent output throughput
    num_waiting_tokens: int = 0  # prompt tokens of the waiting sequences (0 where the engine cannot tell)


class Engine(Protocol):
    """The contract between the front end and a backend. generate() is an async iterator of Deltas,
    one or more per step; the last delta of each choice has finish_reason set. Cancelling the iterator
    (client disconnect) must abort the request and free its KV blocks."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer with a chat template

    async def start(self) -> None: ...

    async def shutdown(self, drain_timeout: float = 0.0) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def load(self) -> Load: ...

    def healthy(self) -> bool: ...

    def stats(self) -> dict[str, float]:
        """Counters for /metrics: prompt_tokens_total, generation_tokens_total, num_preemptions_total."""
        ...
