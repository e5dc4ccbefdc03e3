"""Linear layers on CPU through oneDNN with pre-packed weights.

PyTorch's CPU build sends F.linear to MKL's sgemm. On this project's CPU machines (AMD EPYC, AVX-512)
oneDNN's JIT GEMM over a weight reordered once at load is much faster on the skinny matmuls of decoding:
measured on a 2-core EPYC, fp32, SmolLM2 shapes, M = batch rows (same script, same minute):

    gate_up 576x3072   M=4: 0.35 -> 0.09 ms    M=64: 1.39 -> 1.05 ms    M=512: 9.8 -> 8.5 ms
    lm_head 576x49152  M=4: 17.4 -> 4.7 ms     M=64: 34.2 -> 19.4 ms    M=512: 209 -> 161 ms

The runner packs the linear layers (backends/parallel.py's Linear) and the vocabulary rows used for logits
after loading; the packed copy is opaque (a oneDNN tensor), so the dense weight is kept for what else reads
it (the tied embedding's lookup, state_dict). That doubles the memory of linear weights on CPU, where only
small models are served; layers only read as weights (MLA's kv_b_proj) are not packed.

The ops are the ones Inductor's CPU fusion passes emit (torch.ops.mkldnn._reorder_linear_weight and
_linear_pointwise); where this torch build lacks them, nothing is packed and F.linear runs.
"""

from __future__ import annotations

import torch

BATCH_HINT = 64  # rows oneDNN tunes the packed layout for; measured insensitive from 1 to 2048 rows
DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` on this CPU (bf16 needs AVX-512 BW/VL/DQ, as Inductor checks)."""
    if not available() or dtype not in DTYPES:
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN copy of a [out, in] weight for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) with a weight from `pack`; x may have any leading dims."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
