"""Attention backends by name: the profile's `engine.attention_kernel` picks one for its device.

Entries name their backend class as a "module:Class" string, imported only by get_attention_backend, so
reading or listing the registry never imports triton, torch_npu or torch_mlu, and the availability check
(find_spec on the vendor modules, the device type, the block size) never starts a device. Every backend
implements glm_kernels/backend.py: AttentionBackend, which owns its KV-cache layout (the class's kv_layout and
mla_layout): the layout is the chosen backend's, never configured apart from it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry imports no torch: config validation reads it
    from glm_kernels.backend import AttentionBackend


class AttentionKernelError(ValueError):
    """engine.attention_kernel names a kernel that is unknown or cannot run here."""


@dataclass(frozen=True, slots=True)
class KernelSpec:
    backend: str  # "module:Class", an AttentionBackend
    devices: tuple[str, ...]  # torch device types it runs on
    requires: tuple[str, ...] = ()  # importable modules it needs (checked without importing them)
    tools: tuple[str, ...] = ()  # programs it needs on PATH; "$CXX" is the C++ compiler ($CXX, else c++)
    block_sizes: tuple[int, ...] | None = None  # allowed engine.block_size values; None: any
    interpreter_on_cpu: bool = False  # also runs on cpu under TRITON_INTERPRET=1 (tests)
    description: str = ""


ATTENTION_KERNELS: dict[str, KernelSpec] = {
    "reference": KernelSpec(
        "glm_kernels.reference:ReferenceBackend",
        devices=("cpu", "cuda", "npu", "mlu"),
        description="plain torch (gather + SDPA); the correctness oracle and the CPU kernel",
    ),
    "cpu": KernelSpec(
        "glm_kernels.cpu_paged:CpuBackend",
        devices=("cpu",),
        requires=("ninja",),
        tools=("$CXX",),
        description="C++ decode kernel reading KV blocks in place (built once per machine), per-request SDPA "
        "for prefill chunks; MLA as the reference",
    ),
    "triton": KernelSpec(
        "glm_kernels.triton_backend:TritonBackend",
        devices=("cuda",),
        requires=("triton",),
        interpreter_on_cpu=True,
        description="Triton paged decode (split-KV) and prefill kernels, MLA with DSA top-k",
    ),
    "ascend": KernelSpec(
        "glm_kernels.ascend:AscendBackend",
        devices=("npu",),
        requires=("torch_npu",),
        block_sizes=(128,),  # FIA paged prefill needs a multiple of 128; its MLA path needs 16 or 128
        description="torch_npu fused inference attention (FIA, ATB paged attention, sparse FA); split MLA cache",
    ),
    "cambricon": KernelSpec(
        "glm_kernels.cambricon:CambriconBackend",
        devices=("mlu",),
        requires=("torch_mlu", "torch_mlu_ops"),
        description="torch_mlu_ops flash_attention / single_query_cached_kv_attn over head-major KV caches",
    ),
}


def module_present(name: str) -> bool:
    """Whether `name` could be imported, without importing it (a module already in sys.modules counts)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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


def backend_class(name: str) -> type[AttentionBackend]:
    """The backend class of entry `name`, imported now (its vendor library is imported on first call)."""
    module, _, attr = ATTENTION_KERNELS[name].backend.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_attention_backend(
    name: str, device: str, block_size: int | None = None, cache_dir: str | None = None
) -> AttentionBackend:
    """A backend of entry `name`, set up (a kernel built on first use is built now, under `cache_dir`: the
    engine's; None: the default)."""
    check_attention_kernel(name, device, block_size)
    cls = backend_class(name)
    try:
        cls.setup(cache_dir)
    except Exception as exc:
        raise AttentionKernelError(f"engine.attention_kernel {name!r} could not be set up: {exc}") from exc
    return cls()
