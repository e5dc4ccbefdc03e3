"""The engine core: scheduler, KV cache manager, model runner (sampler included) and drafter, and the loop
that drives them. No text, no HTTP: requests come in as token ids, and each step's output goes out as one
StepOutputs message (server/engine_core_messages.py).

The same core runs in a thread of the HTTP process or in a process of its own (server/engine_core_client.py);
it only sees an inbox of CoreInput messages and a `send` function for its outputs."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from backends.spec_decode.drafter import propose_drafts
from server.config import EngineConfig
from server.engine_core_messages import (
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutput,
    CoreStats,
    Dead,
    Ready,
    RequestOutput,
    Shutdown,
    StepOutputs,
    params_from_wire,
)
from server.scheduler.request import Request
from server.scheduler.scheduler import Scheduler, SchedulerOutput
from server.scheduler.spec_decode_stats import spec_decode_stats

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.spec_config = self.drafter = None  # speculative decoding (set by load_model)
        self.num_steps = 0
        self._num_added = [0, 0]  # sequences and prompt tokens taken from the inbox
        self._scheduled_at: dict[str, float] = {}  # first-scheduled time, until the request's first output

    def load_model(self) -> Ready:
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
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)  # the structured-output grammars need it
        self.eos_token_ids = eos_token_ids(self.model_dir, tokenizer)
        self.runner = TorchModelRunner(cfg, self.model_dir)
        self.runner.load_model()  # with tensor_parallel_size > 1, also starts the worker ranks
        self.runner.enable_structured_outputs(tokenizer, self.eos_token_ids)
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
        vocab_size = self.runner.hf_config.vocab_size
        return Ready(
            str(self.model_dir), self.max_model_len, vocab_size, sorted(self.eos_token_ids), self.stats()
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

    def shutdown(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown()  # tensor-parallel workers

    # --- inputs ------------------------------------------------------------------------------------
    def add(self, message: AddRequest) -> RequestOutput | None:
        """Queue a request; a request that cannot be served at all is answered at once ("refused")."""
        self._num_added[0] += 1
        self._num_added[1] += len(message.prompt_token_ids)
        params = params_from_wire(message.params)
        refusal = self._refusal(params)
        if self.scheduler.get_request(message.request_id) is not None:
            refusal = f"request id {message.request_id!r} is already being served"
        if refusal is not None:
            return RequestOutput(message.request_id, [], finish_reason="refused", error=refusal)
        request = Request(
            message.request_id, message.prompt_token_ids, params, self.eos_token_ids,
            message.arrival_time or time.monotonic(), client=message.client,
        )  # fmt: skip
        self.scheduler.add(request)
        return None

    def _refusal(self, params) -> str | None:
        """Why a request cannot be served at all (its logit_bias ids the front end checked already)."""
        if params.structured is not None:
            error = self.runner.compile_constraint(params.structured)
            if error is not None:
                return f"The structured-output constraint cannot be compiled for this model: {error}"
        return None

    def abort(self, request_ids: list[str]) -> None:
        """Finish the requests (client gone, or a stop string the front end found); their KV blocks are
        freed at once. Ids already finished are ignored."""
        for request in self.scheduler.abort(request_ids):
            self._forget(request.request_id)

    def _forget(self, request_id: str) -> None:
        self.runner.release(request_id)
        self._scheduled_at.pop(request_id, None)

    # --- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update; the outputs of the requests that advanced or finished."""
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
        self.num_steps += 1
        outputs = [
            RequestOutput(r.request_id, [], finish_reason="error", error=r.error) for r in out.finished
        ]
        finished_ids = {r.request_id for r in finished}
        for s in out.scheduled:
            request = s.request
            rid = request.request_id
            if rid not in sampled:
                continue
            kept = sampled[rid][: request.num_output_tokens - num_before[rid]]  # none after a stop
            outputs.append(self._output(request, kept, rid in finished_ids))
        for request in (*out.finished, *finished):
            self._forget(request.request_id)
        return outputs

    def _mark_scheduled(self, out: SchedulerOutput) -> None:
        now = time.monotonic()
        for s in out.scheduled:
            if s.request.num_output_tokens == 0:
                self._scheduled_at.setdefault(s.request.request_id, now)

    def _output(self, request: Request, results: list, finished: bool) -> RequestOutput:
        logprobs = None
        if request.params.logprobs is not None:
            logprobs = [(r.logprob, r.top_ids or [], r.top_logprobs or []) for r in results]
        return RequestOutput(
            request.request_id,
            [r.token_id for r in results],
            logprobs,
            finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
            num_cached_tokens=request.num_cached_tokens,
            scheduled_time=self._scheduled_at.pop(request.request_id, None),
        )

    def stats(self) -> CoreStats:
        sched = self.scheduler
        counters = {
            "num_preemptions_total": float(sched.num_preemptions_total),
            "prefix_cache_queries_total": float(sched.prefix_cache_queries_total),
            "prefix_cache_hits_total": float(sched.prefix_cache_hits_total),
            "num_kv_blocks": float(sched.kv.num_blocks),
        }
        if self.spec_config is not None:
            counters.update(spec_decode_stats(sched.spec_stats, self.spec_config.num_speculative_tokens))
        return CoreStats(
            sched.num_running, sched.num_waiting, sched.num_waiting_tokens, sched.kv.usage(),
            self._num_added[0], self._num_added[1], counters,
        )  # fmt: skip


def run_core_loop(core: EngineCore, inbox: queue.Queue, send: Callable[[CoreOutput], Any]) -> None:
    """The core's busy loop: take new requests and aborts -> schedule -> execute -> update -> send this
    step's outputs. Idle, it blocks on the inbox. Returns on Shutdown; a failure is sent as Dead."""
    try:
        while True:
            refused, stop = _take_inputs(core, inbox, block=not core.scheduler.has_unfinished())
            if stop:  # the aborts that came with Shutdown are applied: the front end's last load is true
                send(StepOutputs(refused, core.stats(), core.num_steps))
                return
            outputs = refused + (core.step() if core.scheduler.has_unfinished() else [])
            send(StepOutputs(outputs, core.stats(), core.num_steps))
    except BaseException as exc:  # the core is dead: the front end fails every request
        log.exception("engine core loop died")
        send(Dead(f"engine failed: {exc}"))


def _take_inputs(core: EngineCore, inbox: queue.Queue, block: bool) -> tuple[list[RequestOutput], bool]:
    """Apply every message waiting in the inbox (waiting for one first when idle); returns the refusals
    and whether Shutdown came."""
    refused: list[RequestOutput] = []
    while True:
        try:
            message: CoreInput = inbox.get(block=block)
        except queue.Empty:
            return refused, False
        block = False
        if isinstance(message, Shutdown):
            return refused, True
        if isinstance(message, AddRequest):
            refusal = core.add(message)
            if refusal is not None:
                refused.append(refusal)
        elif isinstance(message, AbortRequests):
            core.abort(message.request_ids)
