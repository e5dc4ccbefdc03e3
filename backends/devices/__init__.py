"""Device adapters by name, imported lazily: importing or probing an adapter never starts a device."""

from __future__ import annotations

import importlib

DEVICE_REGISTRY: dict[str, str] = {
    "cpu": "backends.devices.cpu:CpuDevice",
}


def get_device(name: str):
    path = DEVICE_REGISTRY.get(name)
    if path is None:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(sorted(DEVICE_REGISTRY))})")
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)()
