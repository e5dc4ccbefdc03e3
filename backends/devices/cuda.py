"""NVIDIA GPUs through torch's own CUDA build, and the NVIDIA cards the profiles size for."""

from __future__ import annotations

from backends.devices.base import MIB, AcceleratorSpec, DeviceAdapter, torch_version

# Sparse MLA (GLM-5's DSA): FlashMLA's sparse kernels were written for Hopper (deepseek-ai/FlashMLA PR #98)
# and vLLM refuses other GPUs: "FlashMLA Sparse is only supported on Hopper and Blackwell DC devices"
# (vllm-project/vllm issue #54059; issue #30644 "FLASHMLA_SPARSE (SM90/SM100 only)"). A100 is SM80.
# FP8: vLLM runs FP8 W8A8 on compute capability >= 8.9; Ampere only as weight-only W8A16 through FP8
# Marlin (vLLM docs, features/quantization/fp8) and not for every MoE path, so A100 is offered bf16 only.
ACCELERATORS = {
    "h100-80gb": AcceleratorSpec(
        name="h100-80gb",
        device="cuda",
        memory_bytes=81559 * MIB,
        weight_dtypes=("bfloat16", "fp8"),
        kv_cache_dtypes=("bfloat16", "fp8"),
        sparse_mla=True,
        vllm_plugin="vllm",
        source="nvidia-smi on 'NVIDIA H100 80GB HBM3' reports 81559MiB; FP8 W8A8 per vLLM fp8 docs (>= SM89)",
    ),
    "h200-141gb": AcceleratorSpec(
        name="h200-141gb",
        device="cuda",
        memory_bytes=143771 * MIB,
        weight_dtypes=("bfloat16", "fp8"),
        kv_cache_dtypes=("bfloat16", "fp8"),
        sparse_mla=True,
        vllm_plugin="vllm",
        source="nvidia-smi on 'NVIDIA H200' reports 143771MiB (141 GB HBM3e in vLLM's GLM-5 recipe)",
    ),
    "a100-80gb": AcceleratorSpec(
        name="a100-80gb",
        device="cuda",
        memory_bytes=85_056_798_720,
        weight_dtypes=("bfloat16",),
        kv_cache_dtypes=("bfloat16",),
        sparse_mla=False,
        vllm_plugin="vllm",
        source="torch total_memory of 'NVIDIA A100-SXM4-80GB' (85,056,798,720 B) recorded in a public test fixture",
    ),
    "a100-40gb": AcceleratorSpec(
        name="a100-40gb",
        device="cuda",
        memory_bytes=40960 * MIB,
        weight_dtypes=("bfloat16",),
        kv_cache_dtypes=("bfloat16",),
        sparse_mla=False,
        vllm_plugin="vllm",
        source="40 GiB as SkyPilot's accelerator catalogue records 'A100-SXM4-40GB' (MemoryMB 1024*40)",
    ),
}


class CudaDevice(DeviceAdapter):
    device_type = "cuda"
    dist_backend = "nccl"
    device_control_env_var = "CUDA_VISIBLE_DEVICES"
    device_node_glob = "/proc/driver/nvidia/version"  # present once the NVIDIA kernel driver is loaded
    supported_dtypes = ("float32", "bfloat16", "float16")
    attention_kernels = ("reference", "triton")  # names in glm_kernels/registry.py

    def library_present(self) -> bool:
        """A CUDA build of torch; torch.backends.cuda.is_built() reads a build flag and touches no GPU."""
        import torch

        return bool(torch.backends.cuda.is_built())

    def _library_missing(self) -> str:
        release = torch_version()
        return (
            f"device 'cuda' needs a CUDA build of torch; this environment has torch {release} built without CUDA. "
            f"Install the CUDA wheel of the same release, e.g. `pip install torch=={release} --index-url "
            "https://download.pytorch.org/whl/cu130` (pick the CUDA version your NVIDIA driver supports; "
            "see https://pytorch.org/get-started/locally/)."
        )
