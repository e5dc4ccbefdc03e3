"""Device adapters by name, imported lazily: importing or probing an adapter never starts a device.

The adapter modules import no vendor library at module level, so reading an adapter class (its identity
attributes) or an accelerator spec is safe anywhere, including config validation on a CPU-only host."""

from __future__ import annotations

import importlib

from backends.devices.base import AcceleratorSpec, DeviceAdapter, DeviceLibraryMissing

DEVICE_REGISTRY: dict[str, str] = {
    "cpu": "backends.devices.cpu:CpuDevice",
    "cuda": "backends.devices.cuda:CudaDevice",
    "npu": "backends.devices.ascend:AscendDevice",
    "mlu": "backends.devices.cambricon:CambriconDevice",
}
DEVICE_ALIASES = {"ascend": "npu", "cambricon": "mlu", "nvidia": "cuda"}
ACCELERATOR_MODULES = ("backends.devices.cuda", "backends.devices.ascend", "backends.devices.cambricon")

__all__ = [
    "AcceleratorSpec", "DeviceAdapter", "DeviceLibraryMissing", "DEVICE_REGISTRY",
    "accelerators", "device_class", "get_accelerator", "get_device",
]  # fmt: skip


def device_class(name: str) -> type[DeviceAdapter]:
    path = DEVICE_REGISTRY.get(DEVICE_ALIASES.get(name, name))
    if path is None:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(sorted(DEVICE_REGISTRY))})")
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_device(name: str) -> DeviceAdapter:
    return device_class(name)()


def accelerators() -> dict[str, AcceleratorSpec]:
    out: dict[str, AcceleratorSpec] = {}
    for module in ACCELERATOR_MODULES:
        out.update(importlib.import_module(module).ACCELERATORS)
    return out


def get_accelerator(name: str) -> AcceleratorSpec:
    table = accelerators()
    if name not in table:
        raise ValueError(f"unknown accelerator {name!r} (known: {', '.join(sorted(table))})")
    return table[name]
