"""One HTTP request's work on the engine, shared by chat and text completions.

Generation iterates the engine's deltas (one engine request per prompt, merged, with global choice
indices), observes the latency metrics per choice, keeps usage, and when closed early (the client went
away, an error, a shutdown) aborts what is unfinished so its KV blocks return to the pool. Closing is
shielded from cancellation and happens in a finally, never in a generator finalizer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server import tracing
from server.engine_api import Delta, Engine, EngineDeadError, EngineError, GenerateRequest
from server.errors import bad_request, unavailable
from server.metrics import ServerMetrics
from server.protocol import PromptTokensDetails, Usage
from server.request_record import RequestRecord

log = logging.getLogger("glm_serve.generation")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


@dataclass(slots=True)
class ChoiceState:
    arrival: float
    scheduled_time: float | None = None  # first scheduled by the engine (end of queueing)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Generation:
    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        requests: list[GenerateRequest],
        record: RequestRecord,
        registry: set[Generation],
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.requests = requests
        self.n = requests[0].n
        self.record = record
        self.choices = {
            i * self.n + j: ChoiceState(arrival=request.arrival_time)
            for i, request in enumerate(requests)
            for j in range(self.n)
        }
        self.prompt_tokens = [len(r.prompt_token_ids) for r in requests]
        self.cached_tokens = [0] * len(requests)
        self.first_token_time: float | None = None
        self._source: Any = None
        self._prefetched: Delta | None = None
        self._closed = False
        self._registry = registry
        registry.add(self)

    # -- iteration ------------------------------------------------------------------------------------
    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Delta:
        if self._prefetched is not None:
            delta, self._prefetched = self._prefetched, None
            return delta
        if self._source is None:
            self._source = self._open_source()
        try:
            delta = await self._source.__anext__()
        except EngineError as exc:
            raise bad_request(str(exc)) from exc
        except EngineDeadError as exc:
            raise unavailable(
                "The engine stopped working; see the server log.", 30.0, code="engine_dead"
            ) from exc
        self._observe(delta)
        if delta.finish_reason == "error":
            raise bad_request(delta.error or "The engine could not serve this request.")
        if delta.finish_reason == "abort":
            raise unavailable(
                "The server aborted this request (it is shutting down).", 5.0, code="request_aborted"
            )
        return delta

    async def prefetch(self) -> None:
        """Wait for the first delta, so that errors before any output are answered with a status code."""
        self._prefetched = await self.__anext__()

    def _open_source(self) -> Any:
        if len(self.requests) == 1:
            return aiter(self.engine.generate(self.requests[0]))
        return _MergedDeltas(self.engine, self.requests)

    def _observe(self, delta: Delta) -> None:
        now = time.monotonic()
        choice = self.choices[delta.index]
        new_tokens = delta.num_output_tokens - choice.num_output_tokens
        if new_tokens > 0:
            if choice.last_token_time is None:
                first = delta.first_token_time or now
                scheduled = getattr(delta, "scheduled_time", None) or first
                choice.scheduled_time, choice.first_token_time = scheduled, first
                self.metrics.observe_first_token(first - choice.arrival, scheduled - choice.arrival)
                if self.first_token_time is None:
                    self.first_token_time = first
                    self.record.ttft_s = round(first - choice.arrival, 4)
            else:
                self.metrics.observe_inter_token((now - choice.last_token_time) / new_tokens)
            choice.last_token_time = now
            choice.num_output_tokens = delta.num_output_tokens
        prompt_index = delta.index // self.n
        self.prompt_tokens[prompt_index] = delta.num_prompt_tokens
        self.cached_tokens[prompt_index] = max(self.cached_tokens[prompt_index], delta.num_cached_tokens)
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            self.metrics.observe_finished(
                delta.finish_reason, now - choice.arrival, delta.num_prompt_tokens, choice.num_output_tokens
            )
            if choice.first_token_time is not None and choice.scheduled_time is not None:
                tracing.record_phases(choice.arrival, choice.scheduled_time, choice.first_token_time, now)

    # -- results --------------------------------------------------------------------------------------
    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens)
        completion = sum(c.num_output_tokens for c in self.choices.values())
        cached = sum(self.cached_tokens)
        details = PromptTokensDetails(cached_tokens=cached) if cached else None
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            prompt_tokens_details=details,
        )  # fmt: skip

    def _unfinished_requests(self) -> list[GenerateRequest]:
        return [
            request
            for i, request in enumerate(self.requests)
            if any(self.choices[i * self.n + j].finish_reason is None for j in range(self.n))
        ]

    async def abort(self) -> None:
        """Ask the engine to end this generation; its final "abort" deltas end the response (a 503, or
        an error event in a stream) while the route still owns it."""
        for request in self._unfinished_requests():
            await self.engine.abort(request.request_id)

    async def close(self) -> None:
        """Close the engine streams (idempotent, shielded) and complete the request record. Closing a
        stream early aborts its request in the engine (the Engine contract), so each unfinished request
        is aborted once; a request whose stream never opened was never queued."""
        if self._closed:
            return
        self._closed = True
        self._registry.discard(self)
        with anyio.CancelScope(shield=True):
            if self._source is not None and hasattr(self._source, "aclose"):
                try:
                    await self._source.aclose()
                except Exception:  # the engine failed while closing
                    log.exception("closing the delta stream of %s failed", self.requests[0].request_id)
        now = time.monotonic()
        for choice in self.choices.values():
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.metrics.observe_finished("abort", now - choice.arrival)
        usage = self.usage()
        self.record.prompt_tokens, self.record.completion_tokens = (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        self.record.finish_reasons = sorted({c.finish_reason or "abort" for c in self.choices.values()})


class _MergedDeltas:
    """Deltas of several engine requests (a batch of prompts) as one stream; prompt i's choice j gets
    the global index i * n + j."""

    def __init__(self, engine: Engine, requests: list[GenerateRequest]) -> None:
        self._queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        self._remaining = len(requests)
        self._tasks = [asyncio.ensure_future(self._pump(engine, r, i * r.n)) for i, r in enumerate(requests)]

    async def _pump(self, engine: Engine, request: GenerateRequest, offset: int) -> None:
        try:
            async for delta in engine.generate(request):
                self._queue.put_nowait(dataclasses.replace(delta, index=offset + delta.index))
        except Exception as exc:
            self._queue.put_nowait(exc)
        self._queue.put_nowait(None)

    def __aiter__(self) -> _MergedDeltas:
        return self

    async def __anext__(self) -> Delta:
        while self._remaining:
            item = await self._queue.get()
            if item is None:
                self._remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def respond(
    request: Request,
    generation: Generation,
    request_id: str,
    *,
    stream: bool,
    stream_body: Callable[[], AsyncIterator[bytes]],
    complete: Callable[[], Awaitable[Response]],
) -> Response:
    """Answer an HTTP request from its generation. A stream starts after the first delta, so errors
    before any output still get a status code; from then on GenerationStream owns (and closes) the
    generation. Otherwise the whole response is gathered. A client gone before its response is ready
    aborts the generation either way."""
    owned_by_stream = False
    try:
        if stream:
            await until_disconnected(request, generation.prefetch())
            owned_by_stream = True
            return GenerationStream(stream_body(), generation, request_id)
        return await until_disconnected(request, complete())
    except ClientDisconnected:
        generation.record.status = 499  # nginx's "client closed request"; nobody reads this response
        return Response(status_code=499)
    finally:
        if not owned_by_stream:
            await generation.close()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run work unless the client disconnects first; then cancel it and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GenerationStream(StreamingResponse):
    """An SSE response that closes its Generation however the response ends: completed, the client
    gone (Starlette cancels the body), or the server cancelling the task at shutdown."""

    def __init__(self, body: AsyncIterator[bytes], generation: Generation, request_id: str) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_body: Callable[[], Awaitable[None]] | None = getattr(self.body_iterator, "aclose", None)
            if close_body is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await close_body()
                    except RuntimeError:  # still running: it was cancelled inside and is finishing
                        pass
            await self._generation.close()


def completion_response(body: BaseModel, request_id: str) -> Response:
    """A whole (non-streamed) completion as JSON, with the request id the access log and ledger use."""
    return Response(
        body.model_dump_json(), media_type="application/json", headers={"X-Request-Id": request_id}
    )
