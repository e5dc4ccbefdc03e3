"""vLLM engine arguments from a glm-serve configuration: the engine section's layout mapped to vLLM's
names, then the profile's `vllm:` section passed through unchanged (speculative_config, compilation_config,
any other EngineArgs field). Names are checked against vLLM's own EngineArgs dataclass when vLLM is
installed, so a typo is a config error naming the closest field, not a silently ignored key."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from server.config_schema import ConfigError, closest

if TYPE_CHECKING:
    from server.config import Config, EngineConfig

# vLLM arguments the engine section owns (the planner and the native engine read them there): setting them
# under vllm: would give two values for one thing.
ENGINE_OWNED = {
    "model": "engine.model",
    "dtype": "engine.dtype",
    "kv_cache_dtype": "engine.kv_cache_dtype",
    "block_size": "engine.block_size",
    "gpu_memory_utilization": "engine.memory_fraction",
    "max_num_seqs": "engine.max_num_seqs",
    "max_num_batched_tokens": "engine.max_num_batched_tokens",
    "max_model_len": "engine.max_model_len",
    "enable_prefix_caching": "engine.enable_prefix_caching",
    "tensor_parallel_size": "engine.tensor_parallel_size",
    "pipeline_parallel_size": "engine.pipeline_parallel_size",
    "data_parallel_size": "engine.data_parallel_size",
    "enable_expert_parallel": "engine.expert_parallel_size",
    "seed": "engine.seed",
    "generation_config": "engine.generation_config",
    "served_model_name": "server.served_model_name",
    "reasoning_parser": "server.reasoning_parser",
}
MTP_METHODS = ("mtp", "glm4_moe_mtp", "deepseek_mtp")  # speculative methods that run the model's MTP layer


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def engine_arg_names() -> frozenset[str]:
    """The fields of vLLM's AsyncEngineArgs (what `vllm serve` flags become)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def check_vllm_section(args: dict[str, Any], sources: dict[str, str]) -> None:
    """vllm.* keys: not one the engine section owns, and (with vLLM installed) a real EngineArgs field."""
    for name in args:
        source = sources.get(f"vllm.{name}", "profile")
        if name in ENGINE_OWNED:
            raise ConfigError(
                f"config key 'vllm.{name}' ({source}): set {ENGINE_OWNED[name]} instead (one value for both backends)"
            )
        if vllm_installed() and name not in engine_arg_names():
            raise ConfigError(
                f"unknown vLLM engine argument 'vllm.{name}' ({source}){closest(name, engine_arg_names())}"
            )
    spec = args.get("speculative_config")
    if spec is not None and not (isinstance(spec, dict) and spec.get("method")):
        raise ConfigError(
            f"config key 'vllm.speculative_config' = {spec!r}: expected a mapping with a method, "
            'e.g. {"method": "mtp", "num_speculative_tokens": 3}'
        )


def uses_mtp(cfg: Config) -> bool:
    """Speculative decoding with the model's own MTP layer: its weights are loaded and must be planned."""
    if cfg.engine.backend == "native":  # the native engine's drafter (backends/spec_decode/mtp.py)
        return (cfg.engine.speculative_config or {}).get("method") in MTP_METHODS
    spec = cfg.extra.get("vllm", {}).get("speculative_config") or {}
    return cfg.engine.backend == "vllm" and spec.get("method") in MTP_METHODS


def engine_args(
    e: EngineConfig, passthrough: dict[str, Any], model: str, served_model_name: list[str],
    reasoning_parser: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """AsyncEngineArgs keyword arguments: the engine section, then the vllm section over it."""
    args: dict[str, Any] = {
        **layout_args(e),
        "model": model,
        "served_model_name": served_model_name,
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "enable_prefix_caching": e.enable_prefix_caching,
        "gpu_memory_utilization": min(e.memory_fraction, 0.3) if e.device == "cpu" else e.memory_fraction,
        "seed": e.seed,
        "disable_log_stats": False,
        # GLM_SERVE_VLLM_EAGER=1 skips torch.compile: minutes less start-up, for tests and smoke runs.
        "enforce_eager": os.environ.get("GLM_SERVE_VLLM_EAGER", "0") == "1",
        "generation_config": e.generation_config,  # auto | vllm | a directory, as vLLM takes it
        # The native engine's grammar library (llguidance): the same grammars compile the same way on both
        # engines, JSON layout included (server/structured_output.py laid_out_schema); vLLM's "auto" would
        # send JSON schemas to xgrammar, which ignores that layout.
        "structured_outputs_config": {"backend": "guidance"},
    }
    if reasoning_parser:
        args["reasoning_parser"] = reasoning_parser
    return args | passthrough


def layout_args(cfg: EngineConfig) -> dict[str, Any]:
    """The profile's parallel layout, cache and quantization settings as vLLM engine arguments.

    FP8 checkpoints (GLM-5-FP8) carry their quantization_config, which vLLM reads itself; Ascend's W8A8 and
    W4A8 checkpoints (ModelSlim) are loaded through vllm-ascend's quantization method "ascend"."""
    args: dict[str, Any] = {"kv_cache_dtype": cfg.kv_cache_dtype}
    if cfg.device != "cpu":  # vLLM's CPU attention picks its own block size (a multiple of 32)
        args["block_size"] = cfg.block_size
    if cfg.weight_dtype in ("w8a8", "w4a8"):
        args["quantization"] = "ascend"
    if cfg.expert_parallel_size > 1:
        args["enable_expert_parallel"] = True
    if cfg.data_parallel_size > 1:
        args["data_parallel_size"] = cfg.data_parallel_size
        args["data_parallel_size_local"] = max(1, cfg.data_parallel_size // cfg.nodes)
        if os.environ.get("GLM_SERVE_DP_ADDRESS"):  # set by the multi-node manifests (deploy/multinode)
            args["data_parallel_address"] = os.environ["GLM_SERVE_DP_ADDRESS"]
            args["data_parallel_rpc_port"] = int(os.environ.get("GLM_SERVE_DP_RPC_PORT", "13345"))
    if cfg.nodes > 1 and cfg.data_parallel_size == 1:
        args["distributed_executor_backend"] = "ray"  # TP inside a node, PP across nodes (deploy/multinode)
    return args
