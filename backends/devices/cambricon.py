"""Cambricon MLUs through torch_mlu (Cambricon's PyTorch adapter, shipped with the Cambricon SDK)."""

from __future__ import annotations

from backends.devices.base import GIB, MIB, AcceleratorSpec, DeviceAdapter, torch_version

# MLU370: the X8 card holds two MLU370 chips with 48 GB LPDDR5 (Cambricon's launch, March 2022) and cnmon
# lists each chip as its own device with 23374 MiB (PaddlePaddle's MLU install guide shows the cnmon
# table). The S4 is one chip; its per-device memory is taken equal to one X8 chip (not measured here).
# MLU370 datatypes per the launch: FP32, FP16, BF16, INT16, INT8, INT4. No vLLM: Cambricon/vllm-mlu's
# README says it supports only devices newer than MLU370 ("仅支持MLU370以上的设备").
# MLU590: public reports show MLU590-M9 at 98304 MiB per card (cnmon, an operator test report) and
# MLU590-M9D at 80 GiB (a test suite's device_memory_gib); the value differs by SKU, so both are listed.
# W8A8 on MLU590 through vllm-mlu's SmoothQuant path (vllm_mlu/model_executor/layers/quantization/
# smoothquant.py); its DSA indexer lives in vllm_mlu/model_executor/layers/indexer.py.
_MLU370 = dict(
    device="mlu",
    memory_bytes=23374 * MIB,
    weight_dtypes=("bfloat16",),
    kv_cache_dtypes=("bfloat16",),
    sparse_mla=False,
    vllm_plugin=None,
)
_MLU590 = dict(
    device="mlu",
    weight_dtypes=("bfloat16", "w8a8"),
    kv_cache_dtypes=("bfloat16",),
    sparse_mla=True,
    vllm_plugin="vllm-mlu",
)
ACCELERATORS = {
    "mlu370-x8": AcceleratorSpec(
        name="mlu370-x8", source="cnmon: 23374 MiB per chip, 2 chips per X8 card", **_MLU370
    ),
    "mlu370-s4": AcceleratorSpec(
        name="mlu370-s4", source="one MLU370 chip; assumed equal to an X8 chip", **_MLU370
    ),
    "mlu590-m9": AcceleratorSpec(
        name="mlu590-m9", memory_bytes=98304 * MIB, source="cnmon 98304 MiB", **_MLU590
    ),
    "mlu590-m9d": AcceleratorSpec(
        name="mlu590-m9d", memory_bytes=80 * GIB, source="80 GiB per report", **_MLU590
    ),
}


class CambriconDevice(DeviceAdapter):
    device_type = "mlu"
    dist_backend = "cncl"  # torch.distributed.init_process_group("cncl") with torch_mlu
    device_control_env_var = "MLU_VISIBLE_DEVICES"
    library = "torch_mlu"
    device_node_glob = (
        "/dev/cambricon_dev*"  # what Cambricon containers are given (--device=/dev/cambricon_dev0)
    )
    supported_dtypes = ("float32", "bfloat16", "float16")
    attention_kernels = ("reference", "cambricon")  # cambricon: torch_mlu_ops kernels

    def is_bf16_supported(self) -> bool:
        namespace = self.require()
        probe = getattr(namespace, "is_bf16_supported", None)
        return bool(probe()) if probe is not None else True  # MLU370 and later list BF16 on their datasheets

    def _library_missing(self) -> str:
        release = torch_version()
        return (
            "device 'mlu' needs torch_mlu (Cambricon's PyTorch adapter), which is not installed. It is not on "
            "PyPI: it ships with the Cambricon SDK (ask ecosystem@cambricon.com, as Cambricon/vllm-mlu's README "
            f"says). Install the torch_mlu build made for torch {release} (builds are tagged like "
            "1.29.2+torch2.7.1) together with the SDK's CNToolkit, CNNL and CNCL, or use the SDK's container."
        )
