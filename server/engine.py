"""NativeEngine: the front end of the native engine, in the HTTP process.

The engine core (scheduler, KV cache, model runner, sampler, drafter: server/engine_core.py) runs in a
process of its own (engine.core_process, the default of `serve`) or in a thread (tests and debugging); see
server/engine_core_client.py. This side keeps the tokenizer and the output processor
(server/output_processor.py): it sends requests and aborts to the core and turns the core's per-step
messages into each request's Deltas on the event loop. load() and stats() read the load and counters that
come with every step's message, so they never wait on the core."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from server.config import EngineConfig
from server.engine_api import Delta, EngineDeadError, EngineError, GenerateRequest, Load
from server.engine_core import EngineCore
from server.engine_core_client import ProcessCoreClient, ThreadCoreClient
from server.engine_core_messages import CoreOutput, CoreStats, Dead, StepOutputs
from server.output_processor import OutputProcessor

log = logging.getLogger(__name__)


class NativeEngine:
    def __init__(self, config: EngineConfig, served_model_name: str | None = None):
        self.config = config
        self._served_name = served_model_name
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.vocab_size = 0
        self.tokenizer = None
        self.model_dir = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self._client: ThreadCoreClient | ProcessCoreClient | None = None
        self._processor: OutputProcessor | None = None
        self._core_stats: CoreStats | None = None
        self._num_steps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._dead: str | None = None
        self._ready = False
        self._stats = {"prompt_tokens_total": 0.0, "generation_tokens_total": 0.0}
        self._rate = _Rate()

    @property
    def core(self) -> EngineCore | None:
        """The engine core in thread mode (tests look inside it); None when it runs in its own process."""
        return self._client.core if self._client is not None else None

    # --- lifecycle ---------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Blocking: start the core, which loads the model; then load the tokenizer it names."""
        from transformers import AutoTokenizer

        cfg = self.config
        self._client = ProcessCoreClient(cfg) if cfg.core_process else ThreadCoreClient(cfg)
        ready = self._client.load()
        self.model_dir = Path(ready.model_dir)
        self.model_name = self._served_name or self.model_dir.name
        self.max_model_len = ready.max_model_len
        self.vocab_size = ready.vocab_size
        self.eos_token_ids = frozenset(ready.eos_token_ids)
        self._core_stats = ready.stats
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # The front-end pool encodes in its threads while the event loop decodes: each its own copy.
        detok_tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._processor = OutputProcessor(detok_tokenizer, self._client.send, cfg.enable_prefix_caching)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            await asyncio.to_thread(self.load_model)
        self._client.start(self._from_core)
        self._ready = True

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        deadline = time.monotonic() + drain_timeout
        processor = self._processor
        while processor is not None and processor.has_unfinished() and time.monotonic() < deadline:
            if self._dead is not None:
                break
            await asyncio.sleep(0.05)
        self._stopping = True
        if self._client is not None:
            await asyncio.to_thread(self._client.shutdown)
        if processor is not None:
            processor.finish_all("server shut down")
        self._ready = False

    def healthy(self) -> bool:
        return self._ready and self._dead is None and not self._stopping

    def load(self) -> Load:
        stats, processor = self._core_stats, self._processor
        if stats is None or processor is None:
            return Load(0, 0, 0.0, 0.0, 0.0)
        in_transit = processor.num_sent[0] - stats.num_added, processor.num_sent[1] - stats.num_added_tokens
        waiting = stats.num_waiting + in_transit[0] + processor.num_parked[0]
        tokens = stats.num_waiting_tokens + in_transit[1] + processor.num_parked[1]
        rate = self._rate.requests_per_s()
        est = waiting / rate if waiting and rate > 0 else 0.0
        return Load(stats.num_running, waiting, stats.kv_usage, est, self._rate.tokens_per_s(), tokens)

    def stats(self) -> dict[str, float]:
        counters = dict(self._core_stats.counters) if self._core_stats is not None else {}
        return {
            **self._stats,
            "num_preemptions_total": 0.0,
            **counters,
            "num_steps_total": float(self._num_steps),
        }

    # --- requests ----------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self._ready or self._processor is None:
            raise EngineError("engine is not running")
        if request.n < 1:
            raise EngineError("n must be at least 1")
        bad_bias = [t for t in request.params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise EngineError(
                f"logit_bias names token id {bad_bias[0]}, outside the vocabulary (0..{self.vocab_size - 1})."
            )
        sink: asyncio.Queue = asyncio.Queue()
        self._processor.add(request, sink)
        self._stats["prompt_tokens_total"] += len(request.prompt_token_ids) * request.n
        remaining = request.n
        try:
            while remaining:
                delta = await sink.get()
                if isinstance(delta, BaseException):
                    remaining = 0
                    raise delta
                if delta.finished:
                    remaining -= 1
                yield delta
        finally:
            if remaining:
                self._processor.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        if self._processor is not None:
            self._processor.abort(request_id)

    # --- the core's messages -------------------------------------------------------------------------
    def _from_core(self, message: CoreOutput) -> None:
        """Called on the core client's thread: hand the message to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._handle, message)

    def _handle(self, message: CoreOutput) -> None:
        if isinstance(message, StepOutputs):
            self._core_stats = message.stats
            self._num_steps = message.step
            if message.outputs and self._processor is not None:
                counts = self._processor.process(message.outputs)
                self._stats["generation_tokens_total"] += counts.num_tokens
                self._rate.tokens(counts.num_tokens)
                if counts.num_finished:
                    self._rate.finished(counts.num_finished)
        elif isinstance(message, Dead) and self._dead is None:
            log.error("the engine core is dead: %s", message.message)
            self._dead = message.message
            if self._processor is not None:
                self._processor.fail_all(EngineDeadError(message.message))


class _Rate:
    """Recent throughput, as exponentially decayed counts over ~10 s."""

    def __init__(self, horizon_s: float = 10.0):
        self.horizon = horizon_s
        self.t0 = time.monotonic()
        self.tok = 0.0
        self.req = 0.0
        self.last = self.t0

    def _decay(self) -> None:
        now = time.monotonic()
        factor = 0.5 ** ((now - self.last) / self.horizon)
        self.tok *= factor
        self.req *= factor
        self.last = now

    def tokens(self, n: int) -> None:
        self._decay()
        self.tok += n

    def finished(self, n: int) -> None:
        self._decay()
        self.req += n

    def _window(self) -> float:
        return max(1e-3, min(time.monotonic() - self.t0, self.horizon / 0.6931))

    def tokens_per_s(self) -> float:
        self._decay()
        return self.tok / self._window()

    def requests_per_s(self) -> float:
        self._decay()
        return self.req / self._window()
