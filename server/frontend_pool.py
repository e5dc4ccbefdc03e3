"""CPU-heavy front-end work (chat-template rendering, tokenization, detokenization, checks of large JSON
bodies) off the event loop, so /health and streaming answer while it runs.

A fixed number of threads and a cap on the jobs waiting for them: past the cap a request gets 503 with
Retry-After instead of a place in an unbounded queue. When the engine core moves to its own process
this stays the seam: `await pool.run(fn, *args)` is all a route knows."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from server.errors import unavailable

T = TypeVar("T")


class FrontendPool:
    def __init__(self, workers: int, max_queued: int) -> None:
        if workers < 1 or max_queued < 1:
            raise ValueError("frontend_workers and frontend_max_queued must be >= 1")
        self.workers = workers
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix="frontend", initializer=_lower_priority
        )
        self._lock = threading.Lock()
        self._jobs = 0  # submitted and not finished (running or waiting for a thread)

    @property
    def jobs(self) -> int:
        return self._jobs

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) in a pool thread. A job counts until it has really finished, even when its
        caller was cancelled (the client left), so a disconnect storm cannot overfill the pool."""
        with self._lock:
            if self._jobs >= self.workers + self.max_queued:
                raise unavailable(
                    "The server is busy preparing other requests; retry shortly.", 1.0, code="server_busy"
                )
            self._jobs += 1
        future: Future[T] = self._executor.submit(partial(fn, *args, **kwargs))
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._jobs -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Pool threads run 5 nice levels below the rest (Linux sets it per thread): when the CPU is short,
    the event loop (/health, streams) is scheduled before a tokenizer. Elsewhere: unchanged."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 5)
    except (AttributeError, OSError):
        pass
