"""NativeEngine: the scheduler and the torch model runner driven by one step loop in a thread of its own.

The loop owns the scheduler (no locks around it): callers hand it work through a queue, and it hands back
Deltas through each request's asyncio queue on the event loop. One step is: take new requests and aborts,
schedule(), execute(), update_from_output(), detokenize, publish."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from backends.spec_decode.drafter import propose_drafts
from server.config import EngineConfig
from server.detokenizer import IncrementalDetokenizer
from server.engine_api import (
    Delta,
    EngineDeadError,
    EngineError,
    GenerateRequest,
    Load,
    TokenLogprob,
    TopLogprob,
)
from server.scheduler.request import Request, RequestStatus
from server.scheduler.scheduler import Scheduler
from server.scheduler.spec_decode_stats import spec_decode_stats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    request: Request
    group_id: str
    index: int
    detok: IncrementalDetokenizer
    sink: asyncio.Queue
    first_token_time: float | None = None
    scheduled_time: float | None = None


@dataclass(slots=True)
class _Group:
    """The n choices of one GenerateRequest. Choices after the first wait until the first has computed
    the prompt, so that they find its blocks in the prefix cache instead of computing them again."""

    request: GenerateRequest
    sink: asyncio.Queue
    live: int  # choices not finished yet
    choices: list[_Choice] = field(default_factory=list)
    pending: list[_Choice] = field(default_factory=list)


class NativeEngine:
    def __init__(self, config: EngineConfig, served_model_name: str | None = None):
        self.config = config
        self._served_name = served_model_name
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.tokenizer = None
        self.model_dir = None
        self._inbox: queue.Queue = queue.Queue()
        self._inbox_lock = threading.Lock()
        self._inbox_load = [0, 0]  # sequences and prompt tokens handed to the loop, not yet in the scheduler
        self._parked_load = [
            0,
            0,
        ]  # the same for choices waiting on their first choice's prompt (loop thread)
        self._wake = threading.Event()
        self._choices: dict[str, _Choice] = {}
        self._groups: dict[str, _Group] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._ready = False
        self._stats = {
            "prompt_tokens_total": 0.0,
            "generation_tokens_total": 0.0,
            "num_preemptions_total": 0.0,
        }
        self._rate = _Rate()
        self.spec_config = self.drafter = None  # speculative decoding (set by load_model)

    # --- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> Load:
        sched = getattr(self, "scheduler", None)
        if sched is None:
            return Load(0, 0, 0.0, 0.0, 0.0)
        with self._inbox_lock:
            inbox_sequences, inbox_tokens = self._inbox_load
        waiting = sched.num_waiting + inbox_sequences + self._parked_load[0]
        tokens = sched.num_waiting_tokens + inbox_tokens + self._parked_load[1]
        rate = self._rate.requests_per_s()
        est = waiting / rate if waiting and rate > 0 else 0.0
        return Load(sched.num_running, waiting, sched.kv.usage(), est, self._rate.tokens_per_s(), tokens)

    def load_model(self) -> None:
        """Blocking: resolve and load the model, size the KV cache, build the scheduler."""
        import torch
        from transformers import AutoTokenizer

        from backends.loader import eos_token_ids, resolve_model_dir
        from backends.torch_runner import TorchModelRunner
        from server.scheduler.kv_cache import KVCacheManager

        cfg = self.config
        if cfg.device == "cpu" and cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)
        self.model_name = self._served_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # The front end encodes on the event loop while the step loop decodes: each thread its own copy.
        self._detok_tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.runner = TorchModelRunner(cfg, self.model_dir)
        self.runner.load_model()  # with tensor_parallel_size > 1, also starts the worker ranks
        self.runner.enable_structured_outputs(self._detok_tokenizer, self.eos_token_ids)
        model_max = getattr(self.runner.hf_config, "max_position_embeddings", 4096)
        self.max_model_len = min(cfg.max_model_len or model_max, model_max)
        try:
            num_blocks = self.runner.profile_num_kv_blocks()
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:
            self.runner.shutdown()
            raise
        self.spec_config, self.drafter = self._make_drafter()
        kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
            cfg.long_prefill_token_threshold, cfg.max_long_partial_prefills,
        )  # fmt: skip
        log.info(
            "KV cache: %d blocks of %d tokens; max_model_len %d",
            num_blocks,
            cfg.block_size,
            self.max_model_len,
        )

    def _make_drafter(self):
        """Speculative decoding's settings and drafter (None, None without speculative_config)."""
        if self.config.speculative_config is None:
            return None, None
        from backends.spec_decode.config import parse_speculative_config
        from backends.spec_decode.ngram import NgramDrafter

        spec = parse_speculative_config(self.config.speculative_config)
        if spec.method == "ngram":
            return spec, NgramDrafter(spec, self.max_model_len)
        return spec, self.runner.mtp_drafter(spec)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if getattr(self, "scheduler", None) is None:
            await asyncio.to_thread(self.load_model)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._ready = True

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        deadline = time.monotonic() + drain_timeout
        while self._choices and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if getattr(self, "runner", None) is not None:
            await asyncio.to_thread(self.runner.shutdown)  # tensor-parallel workers
        for choice in list(self._choices.values()):
            self._publish([(choice.sink, self._final(choice, "abort", error="server shut down"))])
        self._ready = False

    def healthy(self) -> bool:
        return self._ready and self._dead is None and not self._stopping

    def stats(self) -> dict[str, float]:
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            self._stats["num_preemptions_total"] = float(sched.num_preemptions_total)
            self._stats["prefix_cache_queries_total"] = float(sched.prefix_cache_queries_total)
            self._stats["prefix_cache_hits_total"] = float(sched.prefix_cache_hits_total)
            self._stats["num_kv_blocks"] = float(sched.kv.num_blocks)
            if self.spec_config is not None:
                self._stats.update(
                    spec_decode_stats(sched.spec_stats, self.spec_config.num_speculative_tokens)
                )
        return dict(self._stats)

    # --- requests ----------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        if not self._ready:
            raise EngineError("engine is not running")
        if request.n < 1:
            raise EngineError("n must be at least 1")
        sink: asyncio.Queue = asyncio.Queue()
        with self._inbox_lock:
            self._inbox_load[0] += request.n
            self._inbox_load[1] += request.n * len(request.prompt_token_ids)
        self._inbox.put(("add", request, sink))
        self._wake.set()
        remaining = request.n
        try:
            while remaining:
                delta = await sink.get()
                if isinstance(delta, BaseException):
                    raise delta
                if delta.finished:
                    remaining -= 1
                yield delta
        finally:
            if remaining:
                self._inbox.put(("abort", request.request_id, None))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    # --- the step loop (engine thread) -------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.scheduler.has_unfinished():
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as exc:  # the engine is dead: fail every request, report unhealthy
            log.exception("engine loop died")
            self._dead = exc
            err = EngineDeadError(f"engine failed: {exc}")
            self._publish([(c.sink, err) for c in self._choices.values()])
            self._choices.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._inbox_lock:
                    self._inbox_load[0] -= payload.n
                    self._inbox_load[1] -= payload.n * len(payload.prompt_token_ids)
                self._add(payload, sink)
            else:
                self._abort(payload)

    def _add(self, req: GenerateRequest, sink: asyncio.Queue) -> None:
        refusal = self._refusal(req)
        if refusal is not None:
            self._publish([(sink, EngineError(refusal))])
            return
        group = _Group(req, sink, live=req.n)
        for i in range(req.n):
            rid = req.request_id if req.n == 1 else f"{req.request_id}-{i}"
            r = Request(
                rid,
                list(req.prompt_token_ids),
                req.params,
                self.eos_token_ids,
                req.arrival_time or time.monotonic(),
                client=req.client or req.request_id,
            )
            p = req.params
            detok = IncrementalDetokenizer(
                self._detok_tokenizer,
                r.prompt_token_ids,
                p.stop,
                p.skip_special_tokens,
                p.include_stop_str_in_output,
            )
            choice = _Choice(r, req.request_id, i, detok, sink)
            self._choices[rid] = choice
            group.choices.append(choice)
            if i == 0 or not self.config.enable_prefix_caching:
                self.scheduler.add(r)
            else:
                group.pending.append(choice)
                self._park(r, +1)
        self._groups[req.request_id] = group
        self._stats["prompt_tokens_total"] += len(req.prompt_token_ids) * req.n

    def _refusal(self, req: GenerateRequest) -> str | None:
        """Why a request cannot be served at all (checked on the engine thread, before scheduling)."""
        vocab = self.runner.hf_config.vocab_size
        bad_bias = [t for t in req.params.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            return f"logit_bias names token id {bad_bias[0]}, outside the vocabulary (0..{vocab - 1})."
        if req.params.structured is not None:
            error = self.runner.compile_constraint(req.params.structured)
            if error is not None:
                return f"The structured-output constraint cannot be compiled for this model: {error}"
        return None

    def _abort(self, request_id: str) -> None:
        """Abort every choice of a request (O(1) each); a consumer still listening gets a final "abort"
        delta. An id already finished or aborted is ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for choice in group.pending:
            self._park(choice.request, -1)
        group.pending.clear()
        events = []
        for choice in group.choices:
            rid = choice.request.request_id
            if self._choices.pop(rid, None) is None:
                continue  # finished before the abort
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
            self.runner.release(rid)
            events.append((choice.sink, self._final(choice, "abort")))
        self._publish(events)

    def _park(self, request: Request, sign: int) -> None:
        self._parked_load[0] += sign
        self._parked_load[1] += sign * request.num_prompt_tokens

    def step(self) -> None:
        out = self.scheduler.schedule()
        for req in out.preempted:  # recomputed later: its grammar matcher is rebuilt from its tokens
            self.runner.drop_constraint(req.request_id)
        self._mark_scheduled(out)
        sampled = self.runner.execute(out)
        num_before = {s.request.request_id: s.request.num_output_tokens for s in out.scheduled if s.sample}
        finished = self.scheduler.update_from_output(
            out, {rid: [r.token_id for r in results] for rid, results in sampled.items()}
        )
        if self.drafter is not None:
            propose_drafts(self.drafter, self.spec_config, self.scheduler.running)
        events: list = []
        now = time.monotonic()
        for req in out.finished:  # finished inside schedule(): can never fit
            choice = self._choices.get(req.request_id)
            if choice is not None:
                events.append((choice.sink, self._final(choice, "error", error=req.error)))
                self._retire(choice)
        finished_ids = {r.request_id for r in finished}
        num_tokens = 0
        for rid, results in sampled.items():
            choice = self._choices.get(rid)
            if choice is None:
                continue
            kept = results[: choice.request.num_output_tokens - num_before[rid]]  # none after a stop
            num_tokens += len(kept)
            events.append((choice.sink, self._token_delta(choice, kept, rid in finished_ids, now)))
            if choice.index == 0:
                self._release_pending(choice.group_id)
        if finished or out.finished:
            self._rate.finished(len(finished) + len(out.finished))
        self._stats["generation_tokens_total"] += num_tokens
        self._rate.tokens(num_tokens)
        self._publish(events)

    def _mark_scheduled(self, out) -> None:
        now = time.monotonic()
        for s in out.scheduled:
            choice = self._choices.get(s.request.request_id)
            if choice is not None and choice.scheduled_time is None:
                choice.scheduled_time = now

    def _token_delta(self, choice: _Choice, results: list, finished: bool, now: float) -> Delta:
        """The delta of one step's tokens (several with speculative decoding). A stop string ends the
        request at the token that completes it; the tokens after it are dropped."""
        req = choice.request
        if choice.first_token_time is None:
            choice.first_token_time = now
        text, stop = "", None
        for i, result in enumerate(results):
            step = choice.detok.add(result.token_id, final=finished and i == len(results) - 1)
            text += step.text
            if step.stop is not None:
                stop = step.stop
                del req.output_token_ids[req.num_output_tokens - (len(results) - i - 1) :]
                results = results[: i + 1]
                break
        finish_reason = None
        if stop is not None:
            self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED, stop)
            req.stop_reason = stop
            finish_reason = "stop"
        elif finished:
            finish_reason = req.status.finish_reason
            text += choice.detok.flush()
        delta = Delta(
            index=choice.index,
            text=text,
            token_ids=[r.token_id for r in results],
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            logprobs=[self._logprob(r) for r in results] if req.params.logprobs is not None else None,
            finish_reason=finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens,
            first_token_time=choice.first_token_time,
            scheduled_time=choice.scheduled_time,
        )
        if finish_reason is not None:
            self._retire(choice)
        return delta

    def _logprob(self, result) -> TokenLogprob:
        top = [
            TopLogprob(t, self._token_text(t), lp)
            for t, lp in zip(result.top_ids or [], result.top_logprobs or [], strict=True)
        ]
        return TokenLogprob(result.token_id, self._token_text(result.token_id), result.logprob, top)

    def _token_text(self, token_id: int) -> str:
        return self._detok_tokenizer.decode([token_id], skip_special_tokens=False)

    def _final(self, choice: _Choice, reason: str, error: str | None = None) -> Delta:
        req = choice.request
        return Delta(
            index=choice.index,
            text=choice.detok.flush(),
            token_ids=[],
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            finish_reason=reason,
            error=error,
            first_token_time=choice.first_token_time,
        )

    def _retire(self, choice: _Choice) -> None:
        rid = choice.request.request_id
        self._choices.pop(rid, None)
        self.runner.release(rid)
        self._release_pending(choice.group_id)
        group = self._groups.get(choice.group_id)
        if group is not None:
            group.live -= 1
            if group.live == 0:
                del self._groups[choice.group_id]

    def _release_pending(self, group_id: str) -> None:
        """The first choice has its prompt in the cache (or is gone): let the other choices in."""
        group = self._groups.get(group_id)
        if group is None or not group.pending:
            return
        for choice in group.pending:
            self._park(choice.request, -1)
            if choice.request.request_id in self._choices:
                self.scheduler.add(choice.request)
        group.pending.clear()

    def _publish(self, events: list) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list) -> None:
    for sink, item in events:
        sink.put_nowait(item)


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
