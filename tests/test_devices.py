"""Device adapters on a CPU-only host: identity, lazy probing, missing-library messages, and the memory and
bf16 call paths through FAKE vendor modules.

The fakes below (FakeNpuNamespace, FakeMluNamespace, the fake torch_npu / torch_mlu modules) are test
doubles, not the vendor libraries: each implements only the documented semantics these adapters rely on,
`mem_get_info(index) -> (free_bytes, total_bytes)`, `is_bf16_supported() -> bool`, `device_count() -> int`
and `set_device(index)`, as torch.cuda defines them and torch_npu / torch_mlu mirror them."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from backends.devices import DEVICE_REGISTRY, accelerators, device_class, get_accelerator, get_device
from backends.devices.ascend import AscendDevice
from backends.devices.base import GIB, DeviceLibraryMissing, torch_version
from backends.devices.cambricon import CambriconDevice
from backends.devices.cpu import CpuDevice
from backends.devices.cuda import CudaDevice

IDENTITY = {
    "cpu": ("cpu", "gloo", None),
    "cuda": ("cuda", "nccl", "CUDA_VISIBLE_DEVICES"),
    "npu": ("npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES"),
    "mlu": ("mlu", "cncl", "MLU_VISIBLE_DEVICES"),
}


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_attributes(name):
    device = get_device(name)
    assert (device.device_type, device.dist_backend, device.device_control_env_var) == IDENTITY[name]
    assert "reference" in device.attention_kernels  # the plain-torch oracle runs everywhere
    assert set(device.supported_dtypes) <= {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_attention_kernels_are_registered_for_the_device(name):
    from glm_kernels.registry import ATTENTION_KERNELS

    device = get_device(name)
    for kernel in device.attention_kernels:
        assert device.device_type in ATTENTION_KERNELS[kernel].devices, kernel


def test_registry_and_aliases():
    assert set(DEVICE_REGISTRY) == set(IDENTITY)
    assert device_class("ascend") is AscendDevice and device_class("cambricon") is CambriconDevice
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu")


def test_importing_and_probing_never_loads_vendor_libraries():
    code = (
        "import sys\n"
        "from backends.devices import get_device, accelerators\n"
        "accelerators()\n"
        "for name in ('npu', 'mlu'): get_device(name).is_available()\n"
        "print(sorted(m for m in ('torch_npu', 'torch_mlu', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # not even torch: identity and probing read files and the environment only


@pytest.mark.parametrize("cls", [AscendDevice, CambriconDevice])
def test_unavailable_without_library_or_driver(cls):
    assert not cls().is_available()  # no torch_npu / torch_mlu and no /dev/davinci* or /dev/cambricon_dev*


def test_visible_devices_variable(monkeypatch):
    device = AscendDevice()
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    assert device.visible_devices() is None
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0, 1,2")
    assert device.visible_devices() == ["0", "1", "2"]
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    assert device.visible_devices() == [] and not device.is_available()


def test_npu_missing_library_message():
    with pytest.raises(DeviceLibraryMissing) as err:
        AscendDevice().mem_get_info()
    message = str(err.value)
    assert "torch_npu" in message and "CANN" in message
    assert f"pip install torch-npu=={torch_version()}" in message


def test_mlu_missing_library_message():
    with pytest.raises(DeviceLibraryMissing) as err:
        CambriconDevice().is_bf16_supported()
    message = str(err.value)
    assert "torch_mlu" in message and "Cambricon SDK" in message and f"torch {torch_version()}" in message


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_cuda_missing_library_message():
    with pytest.raises(DeviceLibraryMissing) as err:
        CudaDevice().kv_budget_bytes(0.9)
    message = str(err.value)
    assert "CUDA build of torch" in message
    assert f"pip install torch=={torch_version()} --index-url https://download.pytorch.org/whl/cu" in message


class FakeNpuNamespace:
    """FAKE torch.npu: mem_get_info, is_bf16_supported, device_count, set_device, as torch.cuda documents them."""

    def __init__(self, free: int, total: int, bf16: bool):
        self.free, self.total, self.bf16 = free, total, bf16
        self.calls: list[int] = []

    def mem_get_info(self, index: int = 0) -> tuple[int, int]:
        self.calls.append(index)
        return self.free, self.total

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def device_count(self) -> int:
        return 8

    def set_device(self, index: int) -> None:
        self.current = index


@pytest.fixture
def fake_torch_npu(monkeypatch):
    namespace = FakeNpuNamespace(free=40 * GIB, total=64 * GIB, bf16=False)
    module = types.ModuleType("torch_npu")  # FAKE torch_npu: importing it is all the adapter does
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", namespace, raising=False)
    return namespace


def test_npu_memory_and_bf16_through_fake(fake_torch_npu):
    device = AscendDevice()
    assert device.library_present()
    assert device.mem_get_info(3) == (40 * GIB, 64 * GIB) and fake_torch_npu.calls == [3]
    # 0.9 of 64 GiB, minus the 24 GiB already in use (weights): vLLM's gpu_memory_utilization arithmetic
    assert device.kv_budget_bytes(0.9) == int(64 * GIB * 0.9) - 24 * GIB
    with pytest.raises(ValueError, match="no bfloat16 support"):
        device.check_dtype("bfloat16")
    device.check_dtype("float16")


def test_npu_rank_placement_through_fake(fake_torch_npu):
    device = AscendDevice()
    assert device.device_string(5) == "npu:5" and device.device_count() == 8
    device.set_device(5)
    assert fake_torch_npu.current == 5


def test_npu_unavailable_without_device_files_even_with_library(fake_torch_npu):
    assert AscendDevice().library_present() and not AscendDevice().is_available()


def test_mlu_bf16_falls_back_when_runtime_has_no_probe(monkeypatch):
    class FakeMluNamespace:  # FAKE torch.mlu without is_bf16_supported: only mem_get_info
        def mem_get_info(self, index: int = 0) -> tuple[int, int]:
            return 10 * GIB, 80 * GIB

    monkeypatch.setitem(sys.modules, "torch_mlu", types.ModuleType("torch_mlu"))
    monkeypatch.setattr(torch, "mlu", FakeMluNamespace(), raising=False)
    device = CambriconDevice()
    assert device.is_bf16_supported()
    assert device.kv_budget_bytes(0.5) == 0  # 40 GiB allowed, 70 GiB already in use
    assert device.kv_budget_bytes(0.95) == int(80 * GIB * 0.95) - 70 * GIB


def test_cuda_paths_through_fake_runtime(monkeypatch):
    # FAKE CUDA runtime: torch.cuda.mem_get_info / is_bf16_supported with their documented return values.
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    device = CudaDevice()
    assert device.kv_budget_bytes(0.9) == int(80 * GIB * 0.9) - 10 * GIB
    device.check_dtype("bfloat16")


def test_cpu_adapter_keeps_kv_budget():
    cpu = CpuDevice()
    assert cpu.is_available() and cpu.is_bf16_supported()
    assert 0 < cpu.kv_budget_bytes(0.9) <= cpu.available_memory_bytes()
    free, total = cpu.mem_get_info()
    assert 0 < free <= total


def test_accelerator_catalogue():
    table = accelerators()
    assert {
        "h100-80gb",
        "h200-141gb",
        "a100-80gb",
        "a100-40gb",
        "ascend-910b-64gb",
        "mlu370-x8",
        "mlu590-m9d",
    } <= set(table)
    for spec in table.values():
        assert spec.device in ("cuda", "npu", "mlu") and spec.memory_bytes > 0 and spec.source
        device_class(spec.device)  # every catalogue entry names a registered adapter
    assert not get_accelerator("a100-80gb").sparse_mla  # no sparse-MLA kernels on SM80
    assert get_accelerator("mlu370-x8").vllm_plugin is None  # vllm-mlu excludes MLU370
    assert "fp8" not in get_accelerator("ascend-910b-64gb").weight_dtypes  # no FP8 on Ascend
    assert get_accelerator("h100-80gb").memory_bytes == 81559 * 2**20
    with pytest.raises(ValueError, match="unknown accelerator"):
        get_accelerator("tpu-v5")
