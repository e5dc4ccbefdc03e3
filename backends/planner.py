"""Memory planner: does a model fit a profile's hardware and parallel layout, and how much KV cache is left?

`glm-serve plan --profile P --model M [--nodes N] [--context L]` prints weights and KV bytes per device,
the KV tokens that fit and how many sequences of length L run at once, and exits 1 with the reason when the
model does not fit. `glm-serve serve` calls check_fits() with the same arithmetic before loading anything.

Budget per device = the accelerator's memory x engine.memory_fraction (vLLM's gpu_memory_utilization
semantics). Not counted: the activation workspace and CUDA/CANN graphs, which the engine measures at
start-up; the real KV capacity is lower by that (typically a few GiB per device)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from backends.model_dims import (
    KV_BYTES,
    VLLM_FP8_DS_MLA_BYTES,
    Layout,
    ModelDims,
    Precision,
    active_param_count,
    kv_bytes_per_token,
    param_count,
    resolve,
    weight_bytes_per_device,
)
from server.config import Config, ConfigError, EngineConfig, load_config

GB = 1e9


@dataclass(slots=True)
class PlanResult:
    profile: str
    model: str
    model_type: str
    backend: str
    accelerator: str  # "host" for the CPU profile
    devices: int
    tp: int
    pp: int
    dp: int
    ep: int
    weight_dtype: str
    kv_cache_dtype: str
    params: int
    active_params: int
    mtp_params: int
    mtp_loaded: bool
    device_memory_bytes: int
    memory_fraction: float
    budget_bytes: int  # per device
    weight_bytes_total: int  # the whole model at weight_dtype, one copy
    weight_bytes_per_device: int
    kv_bytes_per_token_model: int  # every layer, one copy: the number to check by hand
    kv_bytes_per_token_device: int
    kv_bytes_per_device: int
    kv_tokens_per_replica: int
    replicas: int
    context: int
    concurrent_seqs: int  # sequences of `context` tokens the KV cache holds, over all replicas
    max_num_seqs: int
    fits: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestion: str | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fits(cfg: Config, model_dir_or_name: str | None) -> PlanResult:
    """The planner's verdict for serving `model_dir_or_name` (None: the engine's model, else the embedded
    default) with `cfg`; `serve` refuses to start when `.fits` is False and prints `.reason`.

    Raises ValueError when the model or the hardware cannot be sized: an unknown name, a config.json
    without the needed fields, or a GPU/NPU/MLU profile without engine.accelerator."""
    return plan(cfg, model_dir_or_name)


def plan(
    cfg: Config,
    model: str | None = None,
    *,
    context: int | None = None,
    mtp: bool = False,
    memory_bytes: int | None = None,
) -> PlanResult:
    """mtp: count the MTP layer; it is also counted when the profile runs MTP speculative decoding."""
    from backends.vllm_args import uses_mtp

    e = cfg.engine
    mtp = mtp or uses_mtp(cfg)
    dims = resolve(model or e.model)
    layout = Layout(
        e.tensor_parallel_size, e.pipeline_parallel_size, e.data_parallel_size, e.expert_parallel_size
    )
    weight_dtype = e.dtype if e.weight_dtype == "auto" else e.weight_dtype
    kv_dtype = e.dtype if e.kv_cache_dtype == "auto" else e.kv_cache_dtype
    kv_dtype = "fp8" if kv_dtype.startswith("fp8") else kv_dtype  # fp8_e4m3, fp8_e5m2, fp8_ds_mla: 1 byte
    spec = _accelerator(e)
    capacity = memory_bytes or (spec.memory_bytes if spec else _host_memory())
    budget = int(capacity * e.memory_fraction)
    precision = Precision.of(weight_dtype)
    per_device = int(weight_bytes_per_device(dims, layout, precision, mtp=mtp))
    vllm_cuda = e.backend == "vllm" and e.device == "cuda"
    stage_layers = math.ceil(dims.num_layers / layout.pp)
    # The native engine's MTP drafter keeps its KV pages in the same pool (backends/spec_decode/mtp.py)
    kv_layers = stage_layers + (dims.mtp_layers if e.backend == "native" and uses_mtp(cfg) else 0)
    kv_token_device = kv_bytes_per_token(dims, kv_dtype, kv_layers, layout.tp, vllm_cuda)
    kv_budget = budget - per_device
    if e.device == "cpu" and e.kv_cache_bytes:
        kv_budget = min(e.kv_cache_bytes, kv_budget)
    tokens = max(0, kv_budget) // kv_token_device // e.block_size * e.block_size
    limits = [n for n in (e.max_model_len, dims.max_position) if n]
    length = context or (min(limits) if limits else e.block_size)
    result = PlanResult(
        profile=cfg.profile, model=dims.name, model_type=dims.model_type, backend=e.backend,
        accelerator=spec.name if spec else "host", devices=layout.devices, tp=layout.tp, pp=layout.pp,
        dp=layout.dp, ep=layout.ep, weight_dtype=weight_dtype, kv_cache_dtype=kv_dtype,
        params=param_count(dims), active_params=active_param_count(dims),
        mtp_params=param_count(dims, mtp=True) - param_count(dims), mtp_loaded=mtp,
        device_memory_bytes=capacity, memory_fraction=e.memory_fraction, budget_bytes=budget,
        weight_bytes_total=int(weight_bytes_per_device(dims, Layout(), precision, mtp=mtp)),
        weight_bytes_per_device=per_device,
        kv_bytes_per_token_model=kv_bytes_per_token(dims, kv_dtype, dims.num_layers, 1, vllm_cuda),
        kv_bytes_per_token_device=kv_token_device, kv_bytes_per_device=max(0, kv_budget),
        kv_tokens_per_replica=tokens, replicas=layout.dp, context=length,
        concurrent_seqs=tokens // length * layout.dp if length else 0, max_num_seqs=e.max_num_seqs, fits=True,
    )  # fmt: skip
    result.reasons = _reasons(dims, spec, result)
    result.fits = not result.reasons
    result.notes = _notes(dims, result, vllm_cuda)
    if per_device > budget and spec is not None:
        result.suggestion = _smallest_layout(dims, e, spec, precision, kv_dtype, length, vllm_cuda)
    return result


def _accelerator(e: EngineConfig):
    if e.accelerator is None:
        if e.device != "cpu":
            from backends.devices import accelerators

            raise ValueError(
                f"engine.accelerator is not set, so the planner cannot size the {e.device} devices; "
                f"set it to one of {', '.join(n for n, a in accelerators().items() if a.device == e.device)}"
            )
        return None
    from backends.devices import get_accelerator

    return get_accelerator(e.accelerator)


def _host_memory() -> int:
    from backends.devices.cpu import CpuDevice

    return CpuDevice().total_memory_bytes()


def _reasons(dims: ModelDims, spec, r: PlanResult) -> list[str]:
    out: list[str] = []
    if dims.indexer_layers and spec is not None and not spec.sparse_mla and r.backend == "vllm":
        out.append(
            f"{dims.name} uses DeepSeek sparse attention (MLA + indexer) and {spec.name} has no sparse-MLA "
            "kernels upstream (FlashMLA's sparse kernels need Hopper or Blackwell)"
        )
    if dims.num_heads % r.tp:
        out.append(f"tensor_parallel_size {r.tp} does not divide the {dims.num_heads} attention heads")
    if r.pp > dims.num_layers:
        out.append(f"pipeline_parallel_size {r.pp} exceeds the {dims.num_layers} layers")
    if r.weight_bytes_per_device > r.budget_bytes:
        out.append(
            f"weights need {r.weight_bytes_per_device / GB:.1f} GB per device ({r.weight_dtype}, "
            f"{r.devices} devices) but the budget is {r.budget_bytes / GB:.1f} GB "
            f"({r.device_memory_bytes / GB:.1f} GB x {r.memory_fraction:.2f})"
        )
    elif r.kv_tokens_per_replica < r.context:
        out.append(
            f"the KV cache holds {r.kv_tokens_per_replica:,} tokens per replica, less than one "
            f"{r.context:,}-token sequence (lower engine.max_model_len or --context, or add devices)"
        )
    return out


def _notes(dims: ModelDims, r: PlanResult, vllm_cuda: bool) -> list[str]:
    notes = ["activation workspace and graphs are not counted; the engine measures them at start-up"]
    if r.accelerator == "host":
        notes.append(
            "host profile: the budget is the machine's total RAM, the KV cache engine.kv_cache_bytes"
        )
    if dims.checkpoint_format:
        notes.append(
            f"config.json: the checkpoint is quantized ({dims.checkpoint_format}); planned as {r.weight_dtype}"
        )
    if dims.mtp_layers and not r.mtp_loaded:
        notes.append(f"the MTP layer ({r.mtp_params / 1e9:.1f} B params) is not counted; --mtp adds it")
    if dims.is_mla:
        width = KV_BYTES[r.kv_cache_dtype]
        latent = dims.kv_lora_rank + dims.qk_rope_head_dim
        per_layer = latent * width
        text = f"KV per token = MLA latent {latent} values x {width} B x {dims.num_layers} layers"
        if vllm_cuda and dims.indexer_layers and r.kv_cache_dtype == "fp8":
            per_layer = VLLM_FP8_DS_MLA_BYTES
            text = f"KV per token = fp8_ds_mla record {per_layer} B x {dims.num_layers} layers (vLLM)"
        text += f" = {per_layer * dims.num_layers:,} B"
        if dims.indexer_layers:
            key = (
                dims.index_head_dim + dims.index_head_dim // 128 * 4
                if vllm_cuda
                else dims.index_head_dim * width
            )
            how = "fp8 + fp32 scale, vLLM" if vllm_cuda else f"{dims.index_head_dim} values x {width} B"
            text += f", + indexer keys {key} B ({how}) x {dims.indexer_layers} layers = {key * dims.indexer_layers:,} B"
        notes.append(text + "; every TP rank holds the whole latent")
    if r.concurrent_seqs > r.max_num_seqs:
        notes.append(f"engine.max_num_seqs {r.max_num_seqs} caps the batch below what the KV cache holds")
    return notes


def _smallest_layout(dims, e, spec, precision, kv_dtype, length, vllm_cuda) -> str | None:
    """The fewest devices of this accelerator (powers of two, TP within a node, PP across nodes) that hold
    the weights and one `length`-token sequence."""
    per_node = max(e.devices_per_node, 1)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        tp = min(n, per_node)
        while dims.num_heads % tp:
            tp //= 2
        layout = Layout(tp=tp, pp=n // tp)
        weights = weight_bytes_per_device(dims, layout, precision)
        budget = spec.memory_bytes * e.memory_fraction
        per_token = kv_bytes_per_token(dims, kv_dtype, math.ceil(dims.num_layers / layout.pp), tp, vllm_cuda)
        if layout.pp <= dims.num_layers and weights <= budget and (budget - weights) // per_token >= length:
            nodes = math.ceil(n / per_node)
            return f"{n} x {spec.name} (tp {tp} x pp {layout.pp}, {nodes} node(s) of {per_node}) at {precision_name(e)}"
    return None


def precision_name(e: EngineConfig) -> str:
    return e.dtype if e.weight_dtype == "auto" else e.weight_dtype


def format_table(r: PlanResult) -> str:
    rows = [
        ("profile", f"{r.profile} ({r.backend}), {r.devices} x {r.accelerator}: tp {r.tp} x pp {r.pp} x dp {r.dp}, ep {r.ep}"),
        ("model", f"{r.model} ({r.model_type})"),
        ("parameters", f"{r.params / 1e9:,.2f} B total, {r.active_params / 1e9:,.2f} B active per token"),
        ("weights", f"{r.weight_dtype}: {r.weight_bytes_total / GB:,.1f} GB in all, {r.weight_bytes_per_device / GB:,.2f} GB per device"),
        ("budget", f"{r.device_memory_bytes / GB:,.1f} GB ({r.device_memory_bytes / 2**30:,.1f} GiB) x {r.memory_fraction:.2f} = {r.budget_bytes / GB:,.1f} GB per device"),
        ("KV per token", f"{r.kv_bytes_per_token_model:,} B for the whole model ({r.kv_cache_dtype}), {r.kv_bytes_per_token_device:,} B per device"),
        ("KV cache", f"{r.kv_bytes_per_device / GB:,.2f} GB per device = {r.kv_tokens_per_replica:,} tokens per replica x {r.replicas}"),
        (f"at {r.context:,} tokens", f"{r.concurrent_seqs:,} concurrent sequences (engine.max_num_seqs {r.max_num_seqs})"),
        ("verdict", "FITS" if r.fits else "DOES NOT FIT: " + r.reason),
    ]  # fmt: skip
    if r.suggestion:
        rows.append(("smallest layout", r.suggestion))
    rows += [("note", n) for n in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _coerce(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm-serve plan", description=__doc__.splitlines()[0])
    p.add_argument("--profile", required=True, help="a profile name in configs/ or a YAML path")
    p.add_argument(
        "--model", help="a model directory with config.json, or GLM-5, GLM-4.7, GLM-4.7-Flash, ..."
    )
    p.add_argument("--nodes", type=int, help="nodes to plan for; extra nodes extend pipeline parallelism")
    p.add_argument("--context", type=int, help="sequence length to count concurrent sequences at")
    p.add_argument("--mtp", action="store_true", help="count the MTP layer (speculative decoding) too")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. engine.weight_dtype=w4a8"
    )
    p.add_argument(
        "--all", action="store_true", help="plan every model the profile lists; exit 1 on a surprise"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, not {item!r}")
        overrides[key if "." in key else f"engine.{key}"] = _coerce(value)
    if args.nodes is not None:
        overrides.update(nodes_overrides(args.profile, overrides, args.nodes))
    return overrides


def nodes_overrides(profile: str, overrides: dict[str, Any], nodes: int) -> dict[str, Any]:
    """Plan for `nodes` nodes: pipeline stages scale with the node count (TP stays within a node, as vLLM's
    multi-node guidance puts it: TP = GPUs per node, PP = nodes); a layout that already fits the nodes
    (say, after --set data_parallel_size=1) or sets its stages itself keeps them."""
    if "engine.pipeline_parallel_size" in overrides:
        return {"engine.nodes": nodes}
    base = load_config(profile, overrides, check=False).engine  # validated once the nodes are set
    stages = base.pipeline_parallel_size * nodes
    if nodes >= 1 and stages % base.nodes == 0:
        return {"engine.nodes": nodes, "engine.pipeline_parallel_size": stages // base.nodes}
    if nodes >= 1 and base.tensor_parallel_size * base.pipeline_parallel_size * base.data_parallel_size <= (
        nodes * base.devices_per_node
    ):
        return {"engine.nodes": nodes}
    raise ConfigError(
        f"--nodes {nodes}: the profile's tp {base.tensor_parallel_size} x pp {base.pipeline_parallel_size} x "
        f"dp {base.data_parallel_size} on {base.nodes} node(s) does not scale to it; "
        "set engine.tensor_parallel_size / data_parallel_size with --set"
    )


def plan_profile_models(profile: str) -> list[tuple[dict[str, Any], PlanResult]]:
    """Plan every model a profile lists under `models:`; an entry's other keys are engine overrides
    (weight_dtype, tensor_parallel_size, ...), `nodes` scales the pipeline, `fits` is the expected verdict."""
    out = []
    for entry in load_config(profile).models:
        overrides = {
            f"engine.{k}": v for k, v in entry.items() if k not in ("name", "fits", "nodes", "context")
        }
        if "nodes" in entry:
            overrides.update(nodes_overrides(profile, overrides, int(entry["nodes"])))
        cfg = load_config(profile, overrides)
        out.append((entry, plan(cfg, str(entry["name"]), context=entry.get("context"))))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.all:
            return _main_all(args)
        cfg = load_config(args.profile, _overrides(args))
        model = args.model or cfg.engine.model or _profile_model(cfg)
        result = plan(cfg, model, context=args.context, mtp=args.mtp)
    except (ConfigError, ValueError) as exc:
        print(f"glm-serve plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0 if result.fits else 1


def _main_all(args: argparse.Namespace) -> int:
    rows = plan_profile_models(args.profile)
    if args.json:
        print(json.dumps([{"entry": entry, "plan": r.to_dict()} for entry, r in rows], indent=2))
    for entry, r in rows:
        if args.json:
            break
        changes = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("name", "fits"))
        verdict = "fits" if r.fits else "does not fit"
        print(f"{r.model:<22} {r.devices:>3} x {r.accelerator:<18} {r.weight_dtype:<8} "
              f"{r.weight_bytes_per_device / GB:6.1f} GB/device {r.kv_tokens_per_replica:>10,} KV tokens  "
              f"{verdict:<12}  {changes}")  # fmt: skip
    surprises = [entry for entry, r in rows if "fits" in entry and bool(entry["fits"]) != r.fits]
    for entry in surprises:
        print(f"glm-serve plan: {args.profile} lists {entry} but the planner disagrees", file=sys.stderr)
    return 1 if surprises else 0


def _profile_model(cfg: Config) -> str | None:
    """The first model the profile lists, so `plan --profile P` alone plans what P is meant for."""
    for entry in cfg.models:
        if isinstance(entry, dict) and entry.get("name"):
            return str(entry["name"])
    return None


if __name__ == "__main__":
    sys.exit(main())
