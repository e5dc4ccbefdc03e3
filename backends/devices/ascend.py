"""Huawei Ascend NPUs through torch_npu (Ascend Extension for PyTorch) on CANN, and the 910B variants."""

from __future__ import annotations

from backends.devices.base import GIB, AcceleratorSpec, DeviceAdapter, torch_version

# Weights: vllm-ascend serves GLM-5 as W8A8 and W4A8 (`--quantization ascend`, msmodelslim checkpoints) and
# BF16 (docs/source/tutorials/models/GLM5.md). No FP8: "Huawei Ascend NPU support both INT8 and BF16 modes,
# but FP8 is not supported" (deepseek-ai/DeepSeek-V3 PR #903), so the KV cache stays BF16 too.
# Memory: that tutorial sizes an Atlas 800 A2 as "64G x 8" (910B1/B2/B3 dies); 910B4 servers carry
# 8 x 32 GB (public deployment notes, e.g. vllm-ascend issue #8746 "8x910B4 32GB (256GB total)").
ACCELERATORS = {
    "ascend-910b-64gb": AcceleratorSpec(
        name="ascend-910b-64gb",
        device="npu",
        memory_bytes=64 * GIB,
        weight_dtypes=("bfloat16", "w8a8", "w4a8"),
        kv_cache_dtypes=("bfloat16",),
        sparse_mla=True,
        vllm_plugin="vllm-ascend",
        source="vllm-ascend GLM-5 tutorial: Atlas 800 A2 (64G x 8); no FP8 on Ascend (DeepSeek-V3 PR #903)",
    ),
    "ascend-910b4-32gb": AcceleratorSpec(
        name="ascend-910b4-32gb",
        device="npu",
        memory_bytes=32 * GIB,
        weight_dtypes=("bfloat16", "w8a8", "w4a8"),
        kv_cache_dtypes=("bfloat16",),
        sparse_mla=True,
        vllm_plugin="vllm-ascend",
        source="Atlas 800I A2 32G edition: 8 x 910B4 32GB (public deployment notes; vllm-ascend issue #8746)",
    ),
}


class AscendDevice(DeviceAdapter):
    device_type = "npu"
    dist_backend = "hccl"
    device_control_env_var = "ASCEND_RT_VISIBLE_DEVICES"  # what vllm-ascend's launch scripts set
    library = "torch_npu"
    device_node_glob = "/dev/davinci[0-9]*"  # the devices the vllm-ascend containers are given
    supported_dtypes = ("float32", "bfloat16", "float16")
    attention_kernels = ("reference", "ascend")  # ascend: torch_npu fused infer attention (FIA)

    def _library_missing(self) -> str:
        # The torch_npu wheel is versioned after the torch release it extends, and each wheel is paired with
        # a CANN release: Ascend/pytorch README "Ascend Auxiliary Software" / COMPATIBILITY.md, e.g.
        # torch-npu 2.12.0 with CANN 9.1.0, 2.9.0 with CANN 8.5.0, 2.7.1 with CANN 8.3.RC1.
        release = torch_version()
        return (
            "device 'npu' needs torch_npu (Ascend Extension for PyTorch), which is not installed. Install the "
            f"CANN toolkit and the kernels package for your chip first, then the torch_npu wheel made for torch "
            f"{release}: `pip install torch-npu=={release}` (a .postN release of it is fine). Each torch_npu "
            "release names the CANN version it needs in Ascend/pytorch's version table (e.g. torch-npu 2.12.0 "
            "needs CANN 9.1.0); source CANN's set_env.sh before starting."
        )
