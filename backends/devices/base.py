"""What every device adapter offers, and the accelerator catalogue entries the planner sizes for.

An adapter names its device (torch device type, distributed backend, visible-devices variable, dtypes,
attention kernels) as class attributes, so config validation can read them without importing a vendor
library. Everything that touches the vendor library (memory query, bf16 probe) happens only when called,
and a missing library raises DeviceLibraryMissing naming the package, its version and how to install it."""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from glm_kernels.registry import module_present

GIB = 1 << 30
MIB = 1 << 20


class DeviceLibraryMissing(ImportError):
    """The vendor library of a device is not installed (or not importable) in this environment."""


@dataclass(frozen=True, slots=True)
class AcceleratorSpec:
    """One accelerator model as the planner sees it: one device (die) of a card, not the whole card."""

    name: str  # the engine.accelerator value, e.g. "h200-141gb"
    device: str  # engine.device it runs as: cuda | npu | mlu
    memory_bytes: int  # per device (die), see the source for the unit the vendor or tool reports
    weight_dtypes: tuple[str, ...]  # weight formats with kernels on this hardware
    kv_cache_dtypes: tuple[str, ...]  # KV-cache formats besides "auto"
    sparse_mla: bool  # upstream kernels for DeepSeek sparse attention (GLM-5's DSA) exist
    vllm_plugin: str | None  # the vLLM build that serves it, None when there is none
    source: str  # where memory_bytes and the dtype lists come from

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / 1e9


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_version() -> str:
    """The installed torch's release without the local build tag: "2.13.0" for "2.13.0+cpu"."""
    return (package_version("torch") or "unknown").split("+")[0]


class DeviceAdapter:
    """Base of the device adapters. Subclasses set the identity attributes and `_library_missing`."""

    device_type: ClassVar[str]  # torch device type: "cpu", "cuda", "npu", "mlu"
    dist_backend: ClassVar[str]  # torch.distributed backend: gloo | nccl | hccl | cncl
    device_control_env_var: ClassVar[str | None]  # e.g. CUDA_VISIBLE_DEVICES
    library: ClassVar[str | None] = None  # module that brings the device to torch (torch_npu, torch_mlu)
    device_node_glob: ClassVar[str | None] = None  # device files present when the driver is loaded
    supported_dtypes: ClassVar[tuple[str, ...]]  # compute dtypes (EngineConfig.dtype) the device may run
    attention_kernels: ClassVar[tuple[str, ...]]  # kernels/registry.py names the native engine may use

    # -- probing: never imports the vendor library, never starts a device --------------------------------

    def library_present(self) -> bool:
        return self.library is None or module_present(self.library)

    def driver_present(self) -> bool:
        return self.device_node_glob is None or bool(glob.glob(self.device_node_glob))

    def visible_devices(self) -> list[str] | None:
        """The ids in the visible-devices variable; None when it is unset (all devices visible)."""
        if not self.device_control_env_var or self.device_control_env_var not in os.environ:
            return None
        return [d.strip() for d in os.environ[self.device_control_env_var].split(",") if d.strip()]

    def is_available(self) -> bool:
        """Library importable, driver's device files present, and not hidden by the visible-devices variable.
        Reads files and the environment only."""
        visible = self.visible_devices()
        return self.library_present() and self.driver_present() and (visible is None or len(visible) > 0)

    # -- runtime: imports the vendor library -------------------------------------------------------------

    def require(self) -> ModuleType:
        """The torch namespace of this device (torch.cuda, torch.npu, torch.mlu), importing its library."""
        if not self.library_present():
            raise DeviceLibraryMissing(self._library_missing())
        import torch

        if self.library:
            importlib.import_module(self.library)  # registers torch.<device_type>
        namespace = getattr(torch, self.device_type, None)
        if namespace is None:
            raise DeviceLibraryMissing(self._library_missing())
        return namespace

    def _library_missing(self) -> str:
        return f"device {self.device_type!r} has no library requirement"

    def device_string(self, local_rank: int = 0) -> str:
        """The torch device a rank uses: its index among the visible devices ("npu:3")."""
        return f"{self.device_type}:{local_rank}"

    def device_count(self) -> int:
        """Devices the runtime sees (after the visible-devices variable); imports the vendor library."""
        return int(self.require().device_count())

    def set_device(self, local_rank: int) -> None:
        """Make `local_rank` the current device of this process, before any allocation or collective."""
        self.require().set_device(local_rank)

    def mem_get_info(self, index: int = 0) -> tuple[int, int]:
        """(free, total) bytes of one device, from the vendor runtime."""
        free, total = self.require().mem_get_info(index)
        return int(free), int(total)

    def is_bf16_supported(self) -> bool:
        """The runtime's answer where the library offers one; subclasses may fall back to the datasheet."""
        return bool(self.require().is_bf16_supported())

    def check_dtype(self, dtype: str) -> None:
        """Raise ValueError when this device cannot run `dtype` (checked at run time for bfloat16)."""
        if dtype not in self.supported_dtypes:
            raise ValueError(
                f"{self.device_type} does not run {dtype} (supported: {', '.join(self.supported_dtypes)})"
            )
        if dtype == "bfloat16" and not self.is_bf16_supported():
            raise ValueError(f"this {self.device_type} device reports no bfloat16 support; use float16")

    def kv_budget_bytes(self, memory_fraction: float, index: int = 0) -> int:
        """Bytes left for the KV cache once the weights are loaded: memory_fraction of the device's total,
        minus what is already in use (the same arithmetic as vLLM's gpu_memory_utilization)."""
        free, total = self.mem_get_info(index)
        return max(0, int(total * memory_fraction) - (total - free))
