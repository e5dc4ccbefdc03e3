"""The host CPU."""

from __future__ import annotations

import os


class CpuDevice:
    device_type = "cpu"
    dist_backend = "gloo"
    device_control_env_var = None
    attention_kernels = ("reference",)

    def available_memory_bytes(self) -> int:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def kv_budget_bytes(self, memory_fraction: float) -> int:
        """CPU profiles normally set kv_cache_bytes; otherwise a quarter of available memory, scaled."""
        return int(self.available_memory_bytes() * 0.25 * memory_fraction)
