"""Device-agnostic model runner of the native engine: loads the model, owns the paged KV cache, turns a
SchedulerOutput into one forward pass and samples a token for each request whose computed tokens
reached its tokens.

Tensor parallelism (tensor_parallel_size > 1): the engine's runner is rank 0. It starts the workers
(backends/tp_worker.py), each of which builds a runner of its own rank over its shard and KV cache. Every
step rank 0 broadcasts the step's inputs (StepInputs: plain lists), all ranks run the same forward and meet
in its collectives, and rank 0 alone gathers the logits and samples."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backends.devices import get_device
from backends.loader import iter_safetensors
from backends.models import model_class
from backends.parallel import TensorParallel, pack_model, use
from backends.sampler import Sampler, SampleResult
from backends.spec_decode.config import MTP_ALIASES
from backends.spec_decode.mtp import MtpDrafter
from backends.tp_worker import TPWorkers
from glm_kernels.backend import AttentionBackend, AttentionContext, LayerCache, kv_bytes_per_token
from glm_kernels.metadata import build_step_metadata
from glm_kernels.registry import AttentionKernelError, get_attention_backend, preferred_kernel
from server.config import EngineConfig
from server.scheduler.scheduler import SchedulerOutput
from server.structured_output import StructuredOutput
from server.structured_output_matcher import GrammarMatchers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class StepInputs:
    """What every rank needs for one forward pass; small and picklable (rank 0 broadcasts it)."""

    input_ids: list[int]
    starts: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sample_index: list[int]  # rows of the flattened tokens whose logits are sampled


def step_inputs(out: SchedulerOutput) -> StepInputs:
    """Flatten the step: each request's new tokens (and draft tokens after them) in order; the rows whose
    logits are sampled are its last token's and its drafts'."""
    input_ids: list[int] = []
    sample_index: list[int] = []
    for s in out.scheduled:
        req = s.request
        num_own = s.num_new_tokens - len(s.draft_token_ids)
        tokens = req.all_token_ids() if s.start + num_own > req.num_prompt_tokens else req.prompt_token_ids
        input_ids.extend(tokens[s.start : s.start + num_own])
        input_ids.extend(s.draft_token_ids)
        if s.sample:
            sample_index.extend(range(len(input_ids) - len(s.draft_token_ids) - 1, len(input_ids)))
    return StepInputs(
        input_ids,
        [s.start for s in out.scheduled],
        [s.num_new_tokens for s in out.scheduled],
        [s.block_ids for s in out.scheduled],
        sample_index,
    )


class TorchModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, rank: int = 0):
        self.config = config
        self.model_dir = model_dir
        self.tp = TensorParallel(rank, config.tensor_parallel_size)
        self.device = torch.device(config.device)
        if self.tp.size > 1:
            self.device = torch.device(get_device(config.device).device_string(rank))
        self.dtype = DTYPES[config.dtype]
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
        self.model = None
        self.attn_backend: AttentionBackend | None = None  # chosen at load: owns the KV layout and kernels
        self.kv_caches: list[LayerCache] = []
        self.num_blocks = 0
        self.workers = None  # rank 0 of a tensor-parallel group: backends.tp_worker.TPWorkers
        self.grammars: GrammarMatchers | None = None  # rank 0: structured-output matchers of the sampler
        spec = config.speculative_config or {}
        self.uses_mtp = spec.get("method") in MTP_ALIASES  # load the MTP layer: the drafter
        self.mtp_kv_cache = None  # the MTP layer's KV cache (same block ids as the others)
        self.last_step: tuple[SchedulerOutput, torch.Tensor] | None = (
            None  # with MTP: the final hidden states
        )

    def load_model(self) -> None:
        """Load this rank's shard. Rank 0 of a tensor-parallel group also starts the other ranks first (they
        load in parallel) and then joins the process group with them."""
        if self.tp.size > 1 and self.tp.rank == 0:
            self.workers = TPWorkers(self.config, self.model_dir, type(self))
        try:
            self._load()
            if self.workers is not None:
                self.workers.connect()
        except BaseException:
            self.shutdown()
            raise

    def _load(self) -> None:
        from transformers import AutoConfig

        t0 = time.monotonic()
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.hf_config = hf_config
        cls = model_class(hf_config.model_type)
        if self.tp.size > 1:
            get_device(self.config.device).set_device(self.tp.rank)
        with torch.device(self.device), _skip_param_init(), use(self.tp):
            model = cls(hf_config)
            if self.uses_mtp:
                if not hasattr(model, "add_mtp_layer"):
                    raise ValueError(
                        f"speculative decoding with method mtp needs a GLM MoE model with an MTP layer; "
                        f"{hf_config.model_type} has none: use method ngram"
                    )
                model.add_mtp_layer()
        model.load_weights(iter_safetensors(self.model_dir, lazy=self.tp.size > 1))
        self.model = model.to(self.dtype).eval()
        if self.device.type == "cpu":
            packed = pack_model(self.model)
            log.info("packed %d linear weights for oneDNN", packed)
        self.attn_backend = attention_backend(self.config)
        self.attention_kernel = self.attn_backend.name
        if self.tp.rank == 0:
            self.sampler = Sampler(hf_config.vocab_size, seed=self.config.seed)
        log.info(
            "loaded %s (%s%s) in %.1fs",
            self.model_dir.name,
            hf_config.model_type,
            f", TP rank {self.tp.rank}/{self.tp.size}" if self.tp.size > 1 else "",
            time.monotonic() - t0,
        )

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any) and leave the process group. Idempotent."""
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.stop()

    def _on_all_ranks(self, method: str, *args: Any) -> Any:
        """Run `method` here and, under tensor parallelism, on every worker (which joins its collectives)."""
        if self.workers is None:
            return getattr(self, method)(*args)
        with self.workers.guard():
            self.workers.send(method, args)
            return getattr(self, method)(*args)

    def profile_num_kv_blocks(self) -> int:
        """KV blocks for the configured budget: num_kv_blocks, else kv_cache_bytes, else the memory fraction
        of free device memory after the weights. Budgets are per rank; all ranks take the smallest count."""
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        return self._on_all_ranks("_fit_kv_blocks")

    def _fit_kv_blocks(self) -> int:
        per_block = kv_bytes_per_token(self.model.kv_cache_specs(), self.kv_dtype) * self.config.block_size
        budget = self.config.kv_cache_bytes
        if budget is None:
            budget = get_device(self.config.device).kv_budget_bytes(self.config.memory_fraction, self.tp.rank)
        return self.tp.all_reduce_min(max(1, budget // per_block), self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._on_all_ranks("_allocate_kv_cache", num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self.attn_backend.allocate(
            self.model.kv_cache_specs(), num_blocks, self.config.block_size, self.kv_dtype, self.device
        )
        if self.uses_mtp:
            self.kv_caches, self.mtp_kv_cache = self.kv_caches[:-1], self.kv_caches[-1]

    def enable_structured_outputs(self, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        """Give the sampler grammar matchers over this tokenizer (rank 0, after load_model)."""
        self.grammars = GrammarMatchers(tokenizer, self.hf_config.vocab_size, eos_token_ids)
        self.sampler.grammars = self.grammars

    def compile_constraint(self, constraint: StructuredOutput) -> str | None:
        """Compile a request's constraint before it is scheduled; the error when it cannot be used."""
        if self.grammars is None:
            return "structured outputs are not enabled on this runner"
        return self.grammars.compile(constraint)

    def drop_constraint(self, request_id: str) -> None:
        """A preempted request's matcher is dropped; its next step rebuilds it from the accepted tokens."""
        if self.grammars is not None:
            self.grammars.drop(request_id)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, list[SampleResult]]:
        """One forward pass over every scheduled chunk. Each request with sample=True gets its tokens: one,
        or with draft tokens, the accepted drafts and one more. The sampler works on the logits' device;
        only its choices come to the host."""
        if not out.scheduled:
            return {}
        logits = self._on_all_ranks("run_step", step_inputs(out))
        if self.uses_mtp:
            self.last_step = (out, self.last_hidden)
        if logits is None:
            return {}
        sampled = [s for s in out.scheduled if s.sample]
        drafts = [s.draft_token_ids for s in sampled] if any(s.draft_token_ids for s in sampled) else None
        results = self.sampler(logits, [s.request for s in sampled], drafts)
        return {s.request.request_id: res for s, res in zip(sampled, results, strict=True)}

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> torch.Tensor | None:
        """The forward pass of one step on this rank; the sampled rows' logits on rank 0 (None elsewhere,
        or when nothing is sampled)."""
        attn = self.attention_context(step.starts, step.query_lens, step.block_tables)
        ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, attn.positions, self.kv_caches, attn)
        if self.uses_mtp:
            self.last_hidden = hidden
        if not step.sample_index:
            return None
        return self.model.compute_logits(hidden[torch.tensor(step.sample_index, device=self.device)])

    def attention_context(
        self, starts: list[int], query_lens: list[int], block_tables: list[list[int]]
    ) -> AttentionContext:
        """The backend's metadata for one forward pass, built once and shared by every layer."""
        step = build_step_metadata(starts, query_lens, block_tables, self.config.block_size, self.device)
        return AttentionContext.for_step(self.attn_backend, step)

    def mtp_drafter(self, spec):
        """The drafter of speculative decoding with method mtp (backends/spec_decode/mtp.py)."""
        if self.tp.size > 1:
            raise ValueError(
                "speculative decoding with method mtp needs tensor_parallel_size 1 on the native engine"
            )
        return MtpDrafter(self, spec.num_speculative_tokens)


def attention_backend(config: EngineConfig) -> AttentionBackend:
    """The profile's attention backend (glm_kernels/registry.py); "auto" picks the fastest one available on
    the device and falls back to the plain-torch reference when it cannot be set up."""
    name = config.attention_kernel
    if name == "auto":
        name = preferred_kernel(config.device, config.block_size)
    try:
        backend = get_attention_backend(name, config.device, config.block_size, config.cache_dir)
    except AttentionKernelError as exc:
        if config.attention_kernel != "auto":
            raise
        log.warning("%s; auto falls back to the reference kernel", exc)
        backend = get_attention_backend("reference", config.device, config.block_size)
    log.info("attention backend: %s", backend.name)
    return backend


@contextlib.contextmanager
def _skip_param_init():
    """Weights are overwritten by the checkpoint: skip the random init of Linear and Embedding."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
