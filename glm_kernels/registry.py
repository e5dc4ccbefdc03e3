"""Attention kernels by name: the profile's `engine.attention_kernel` picks one for its device.

Entries name their functions as "module:function" strings and are imported only by get_attention_kernel, so
reading or listing the registry never imports triton, torch_npu or torch_mlu, and the availability check
(find_spec on the vendor modules, the device type, the block size) never starts a device.

Every entry offers the same two calls (see glm_kernels/reference.py and glm_kernels/mla_reference.py for semantics):
    paged_attention(q [T, heads, dim], k_cache, v_cache, meta, scale) -> [T, heads, v_dim]
    mla_attention(q_nope [T, heads, rank], q_pe [T, heads, rope], latent_cache, meta, scale,
                  topk_indices [T, k] | None) -> [T, heads, rank]
The caches' physical layout is the entry's `kv_layout` / `mla_cache`, which the runner must allocate."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from backends.devices.base import module_present
from server.config import ConfigError

KV_BLOCK_MAJOR = "[num_blocks, block_size, kv_heads, dim]"  # glm_kernels/reference.py's layout
KV_HEAD_MAJOR = "[num_blocks, kv_heads, block_size, dim]"  # torch_mlu_ops' layout
MLA_JOINT = "one [num_blocks, block_size, kv_lora_rank + rope_dim] tensor"
MLA_SPLIT = "a (c_kv [num_blocks, block_size, kv_lora_rank], k_pe [num_blocks, block_size, rope_dim]) pair"


class AttentionKernelError(ConfigError):
    """engine.attention_kernel names a kernel that is unknown or cannot run here."""


@dataclass(frozen=True, slots=True)
class KernelSpec:
    paged_attention: str  # "module:function"
    mla_attention: str | None  # "module:function", None when the entry has no MLA path yet
    devices: tuple[str, ...]  # torch device types it runs on
    requires: tuple[str, ...] = ()  # importable modules it needs (checked without importing them)
    tools: tuple[str, ...] = ()  # programs it needs on PATH; "$CXX" is the C++ compiler ($CXX, else c++)
    setup: str | None = None  # "module:function(cache_dir)" run when the kernel is chosen (builds, loads)
    kv_layout: str = KV_BLOCK_MAJOR
    mla_cache: str = MLA_JOINT
    block_sizes: tuple[int, ...] | None = None  # allowed engine.block_size values; None: any
    interpreter_on_cpu: bool = False  # also runs on cpu under TRITON_INTERPRET=1 (tests)
    description: str = ""


ATTENTION_KERNELS: dict[str, KernelSpec] = {
    "reference": KernelSpec(
        "glm_kernels.reference:paged_attention",
        "glm_kernels.dsa_topk:reference_mla_attention",
        devices=("cpu", "cuda", "npu", "mlu"),
        description="plain torch (gather + SDPA); the correctness oracle and the CPU kernel",
    ),
    "cpu": KernelSpec(
        "glm_kernels.cpu_paged:paged_attention",
        "glm_kernels.dsa_topk:reference_mla_attention",
        devices=("cpu",),
        requires=("ninja",),
        tools=("$CXX",),
        setup="glm_kernels.cpu_paged:load",
        description="C++ decode kernel reading KV blocks in place (built once per machine), per-request SDPA "
        "for prefill chunks; MLA as the reference",
    ),
    "triton": KernelSpec(
        "glm_kernels.triton_paged:paged_attention",
        "glm_kernels.triton_mla:mla_paged_attention",
        devices=("cuda",),
        requires=("triton",),
        interpreter_on_cpu=True,
        description="Triton paged decode (split-KV) and prefill kernels, MLA with DSA top-k",
    ),
    "ascend": KernelSpec(
        "glm_kernels.ascend:paged_attention",
        "glm_kernels.ascend:mla_paged_attention",
        devices=("npu",),
        requires=("torch_npu",),
        mla_cache=MLA_SPLIT,
        block_sizes=(128,),  # FIA paged prefill needs a multiple of 128; its MLA path needs 16 or 128
        description="torch_npu fused inference attention (FIA, ATB paged attention, sparse FA)",
    ),
    "cambricon": KernelSpec(
        "glm_kernels.cambricon:paged_attention",
        "glm_kernels.cambricon:mla_paged_attention",
        devices=("mlu",),
        requires=("torch_mlu", "torch_mlu_ops"),
        kv_layout=KV_HEAD_MAJOR,
        description="torch_mlu_ops flash_attention / single_query_cached_kv_attn",
    ),
}


@dataclass(frozen=True, slots=True)
class AttentionKernel:
    name: str
    spec: KernelSpec
    paged_attention: Callable
    mla_attention: Callable | None


def _device_type(device: str) -> str:
    return str(device).split(":", 1)[0]


def unavailable_reason(name: str, device: str, block_size: int | None = None) -> str | None:
    """Why kernel `name` cannot run on `device` (with `block_size`), or None when it can."""
    spec = ATTENTION_KERNELS[name]
    dev = _device_type(device)
    on_interpreter = dev == "cpu" and spec.interpreter_on_cpu and os.environ.get("TRITON_INTERPRET") == "1"
    if dev not in spec.devices and not on_interpreter:
        return f"it runs on {', '.join(spec.devices)}, not {dev}"
    missing = [m for m in spec.requires if not module_present(m)]
    if missing:
        return f"it needs the Python module(s) {', '.join(missing)}, not installed here"
    tools = [os.environ.get("CXX", "c++") if t == "$CXX" else t for t in spec.tools]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"it needs {', '.join(missing)} on PATH"
    if block_size is not None and spec.block_sizes is not None and block_size not in spec.block_sizes:
        allowed = ", ".join(map(str, spec.block_sizes))
        return f"it needs engine.block_size in ({allowed}), not {block_size}"
    return None


def available_kernels(device: str, block_size: int | None = None) -> list[str]:
    return [n for n in ATTENTION_KERNELS if unavailable_reason(n, device, block_size) is None]


def check_attention_kernel(name: str, device: str, block_size: int | None = None) -> None:
    """Raise AttentionKernelError unless `name` can run on `device`; imports nothing."""
    available = ", ".join(available_kernels(device, block_size)) or "none"
    if name not in ATTENTION_KERNELS:
        raise AttentionKernelError(
            f"unknown engine.attention_kernel {name!r}; available on {device}: {available} "
            f"(known: {', '.join(ATTENTION_KERNELS)})"
        )
    reason = unavailable_reason(name, device, block_size)
    if reason is not None:
        raise AttentionKernelError(
            f"engine.attention_kernel {name!r} is not available on {device}: {reason}; "
            f"available on {device}: {available}"
        )


PREFERENCE = ("triton", "ascend", "cambricon", "cpu", "reference")  # the native engine's choice for "auto"


def preferred_kernel(device: str, block_size: int | None = None) -> str:
    """The fastest kernel that can run on `device` (reference when no other can); imports nothing."""
    return next(n for n in PREFERENCE if unavailable_reason(n, device, block_size) is None)


def _load(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_attention_kernel(
    name: str, device: str, block_size: int | None = None, cache_dir: str | None = None
) -> AttentionKernel:
    """The kernel's functions, imported now (the vendor library itself is imported on first call); a kernel
    built on first use is built now, under `cache_dir` (the engine's; None: the default)."""
    check_attention_kernel(name, device, block_size)
    spec = ATTENTION_KERNELS[name]
    if spec.setup is not None:
        try:
            _load(spec.setup)(cache_dir)
        except Exception as exc:
            raise AttentionKernelError(
                f"engine.attention_kernel {name!r} could not be set up: {exc}"
            ) from exc
    mla = _load(spec.mla_attention) if spec.mla_attention else None
    return AttentionKernel(name, spec, _load(spec.paged_attention), mla)
