"""The Triton backend: block-major GQA caches and joint MLA rows (the reference's layouts), read in place by
glm_kernels/triton_paged.py (GQA decode and prefill) and glm_kernels/triton_mla.py (MLA, DSA top-k)."""

from __future__ import annotations

from typing import ClassVar

import torch

from glm_kernels import triton_mla, triton_paged
from glm_kernels.backend import AttentionBackend, GqaCache, MlaCache
from glm_kernels.metadata import StepMetadata
from glm_kernels.triton_paged import TritonMetadata


class TritonBackend(AttentionBackend[TritonMetadata]):
    name: ClassVar[str] = "triton"

    def build_metadata(self, step: StepMetadata) -> TritonMetadata:
        return triton_paged.build_triton_metadata(step)

    def gqa_attention(self, q, cache: GqaCache, meta: TritonMetadata, scale: float) -> torch.Tensor:
        return triton_paged.paged_attention(q, cache.key, cache.value, meta, scale)

    def mla_attention(self, q_latent, q_pe, cache: MlaCache, meta, scale, topk_indices) -> torch.Tensor:
        return triton_mla.mla_paged_attention(q_latent, q_pe, cache.rows, meta, scale, topk_indices)
