"""Device-agnostic model runner of the native engine: loads the model, owns the paged KV cache, turns a
SchedulerOutput into one forward pass and samples a token for each request whose computed tokens
reached its tokens."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from backends.loader import iter_safetensors
from backends.models import model_class
from backends.sampler import Sampler, SampleResult
from kernels.reference import build_metadata
from server.config import EngineConfig
from server.scheduler.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path):
        self.config = config
        self.model_dir = model_dir
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
        self.model = None
        self.kv_caches: list = []
        self.num_blocks = 0

    def load_model(self) -> None:
        from transformers import AutoConfig

        t0 = time.monotonic()
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.hf_config = hf_config
        cls = model_class(hf_config.model_type)
        with torch.device(self.device), _skip_param_init():
            model = cls(hf_config)
        model.load_weights(iter_safetensors(self.model_dir))
        self.model = model.to(self.dtype).eval()
        self.attention_kernel = install_attention_kernel(self.model, self.config)
        self.sampler = Sampler(hf_config.vocab_size, seed=self.config.seed)
        log.info("loaded %s (%s) in %.1fs", self.model_dir.name, hf_config.model_type, time.monotonic() - t0)

    def profile_num_kv_blocks(self) -> int:
        """KV blocks for the configured budget: num_kv_blocks, else kv_cache_bytes, else the memory fraction
        of free device memory after the weights."""
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        per_block = self.model.kv_bytes_per_token(self.kv_dtype) * self.config.block_size
        budget = self.config.kv_cache_bytes
        if budget is None:
            from backends.devices import get_device

            budget = get_device(self.config.device).kv_budget_bytes(self.config.memory_fraction)
        return max(1, budget // per_block)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self.model.allocate_kv_cache(
            num_blocks, self.config.block_size, self.kv_dtype, self.device
        )

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, SampleResult]:
        """One forward pass over every scheduled chunk; a token for each request with sample=True."""
        if not out.scheduled:
            return {}
        input_ids: list[int] = []
        positions: list[int] = []
        sample_index: list[int] = []
        for s in out.scheduled:
            req = s.request
            tokens = req.all_token_ids() if s.start + s.num_new_tokens > req.num_prompt_tokens else None
            for pos in range(s.start, s.start + s.num_new_tokens):
                input_ids.append(tokens[pos] if tokens is not None else req.prompt_token_ids[pos])
            positions.extend(range(s.start, s.start + s.num_new_tokens))
            if s.sample:
                sample_index.append(len(input_ids) - 1)
        meta = build_metadata(
            [s.start for s in out.scheduled],
            [s.num_new_tokens for s in out.scheduled],
            [s.block_ids for s in out.scheduled],
            self.config.block_size,
            self.device,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if not sample_index:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
        sampled_reqs = [s.request for s in out.scheduled if s.sample]
        results = self.sampler(logits.cpu(), sampled_reqs)
        return {r.request_id: res for r, res in zip(sampled_reqs, results, strict=True)}


def install_attention_kernel(model: nn.Module, config: EngineConfig) -> str:
    """Point every attention layer at the profile's kernel (kernels/registry.py); "auto" picks the fastest
    one available on the device. Layers default to the plain-torch reference."""
    from kernels.registry import get_attention_kernel, preferred_kernel

    name = config.attention_kernel
    if name == "auto":
        name = preferred_kernel(config.device, config.block_size)
    kernel = get_attention_kernel(name, config.device, config.block_size)
    if kernel.name == "reference":
        return kernel.name
    for module in model.modules():
        if hasattr(module, "paged_attention_fn"):
            module.paged_attention_fn = kernel.paged_attention
        if hasattr(module, "mla_attention_fn"):
            if kernel.mla_attention is None:
                raise ValueError(f"attention kernel {kernel.name!r} has no MLA path for this model")
            module.mla_attention_fn = kernel.mla_attention
    log.info("attention kernel: %s", kernel.name)
    return kernel.name


@contextlib.contextmanager
def _skip_param_init():
    """Weights are overwritten by the checkpoint: skip the random init of Linear and Embedding."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
