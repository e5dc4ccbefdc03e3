"""The host CPU: the embedded default's device, and the gloo backend for tests of distributed code."""

from __future__ import annotations

import os

from backends.devices.base import DeviceAdapter


class CpuDevice(DeviceAdapter):
    device_type = "cpu"
    dist_backend = "gloo"
    device_control_env_var = None
    supported_dtypes = ("float32", "bfloat16", "float16")
    attention_kernels = ("cpu", "reference")

    def is_available(self) -> bool:
        return True

    def available_memory_bytes(self) -> int:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def total_memory_bytes(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def device_string(self, local_rank: int = 0) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, local_rank: int) -> None:
        pass  # one host: ranks are processes

    def mem_get_info(self, index: int = 0) -> tuple[int, int]:
        return self.available_memory_bytes(), self.total_memory_bytes()

    def is_bf16_supported(self) -> bool:
        return True  # torch implements every CPU op in bfloat16 (slower than fp32 without AMX)

    def kv_budget_bytes(self, memory_fraction: float, index: int = 0) -> int:
        """CPU profiles normally set kv_cache_bytes; otherwise a quarter of available memory, scaled."""
        return int(self.available_memory_bytes() * 0.25 * memory_fraction)
