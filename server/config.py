"""Typed configuration: a YAML profile, overridden by GLM_SERVE_* environment variables, overridden by
CLI flags. Unknown keys are errors that name the key."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENV_PREFIX = "GLM_SERVE_"


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class EngineConfig:
    """How the native engine runs a model."""

    model: str | None = None  # a Hugging Face-format directory; None: the embedded SmolLM2 default
    backend: str = "native"  # native | vllm
    device: str = "cpu"  # cpu | cuda | npu | mlu
    dtype: str = "float32"  # float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # auto: same as dtype
    block_size: int = 16
    kv_cache_bytes: int | None = None  # KV cache size; None: derived from memory_fraction
    memory_fraction: float = 0.9  # of free device memory for weights + KV (GPU/NPU); CPU uses kv_cache_bytes
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes when set (tests use it)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    attention_kernel: str = "reference"  # a kernels/ name the device offers; "auto": the backend's choice
    # Hardware layout and weight format, read by the memory planner (backends/planner.py) and validate().
    accelerator: str | None = None  # the card sized for, e.g. h200-141gb (backends/devices); None: the host
    weight_dtype: str = "auto"  # auto (= dtype) | bfloat16 | float16 | float32 | fp8 | w8a8 | w4a8
    data_parallel_size: int = 1  # engine replicas; with expert parallelism experts spread over tp x dp
    nodes: int = 1
    devices_per_node: int = 1
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    seed: int = 0
    cache_dir: str | None = None  # where the embedded model is dequantized; GLM_SERVE_CACHE_DIR


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None  # one key per line, optionally followed by roles: `sk-... admin`
    # Roles (KEY_ROLES); a key listed here is also a valid key. Sovereign requests never leave this server.
    sovereign_keys: list[str] = field(default_factory=list)
    force_overflow_keys: list[str] = field(default_factory=list)  # may send `X-Overflow: force` (testing)
    admin_keys: list[str] = field(default_factory=list)  # may read GET /v1/usage
    protect_metrics: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    max_queued_requests: int = 256
    drain_timeout_s: float = 30.0
    log_prompts: bool = False


@dataclass(slots=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    profile: str = "cpu"
    description: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)  # models the profile is known to fit
    extra: dict[str, Any] = field(default_factory=dict)  # sections owned by other modules (overflow, usage)


_EXTRA_SECTIONS = {"overflow", "usage", "routing", "vllm", "notes"}
KEY_ROLES = ("sovereign", "force_overflow", "admin")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What a presented key may do. key_id is the key's sha256 (16 hex digits): the ledger and logs see
    only that, never the key."""

    key_id: str
    sovereign: bool = False
    force_overflow: bool = False
    admin: bool = False


ANONYMOUS_KEY = ApiKey(key_id="anonymous")  # no API keys configured


def api_key_id(raw: str | bytes) -> str:
    return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()[:16]


def collect_api_keys(server: ServerConfig) -> dict[str, ApiKey]:
    """Every configured key with its roles: server.api_keys, the role lists, and the key file, whose
    lines are `key [role ...]` (# starts a comment line). A key can be sovereign or force overflow, not both."""
    roles: dict[str, set[str]] = {key: set() for key in server.api_keys}
    for role in KEY_ROLES:
        for key in getattr(server, f"{role}_keys"):
            roles.setdefault(key, set()).add(role)
    if server.api_key_file:
        path = Path(server.api_key_file)
        if not path.is_file():
            raise ConfigError(f"api_key_file not found: {path}")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            unknown = [w for w in words[1:] if w not in KEY_ROLES]
            if unknown:
                raise ConfigError(
                    f"api_key_file {path}:{number}: unknown key role {unknown[0]!r} (known: {', '.join(KEY_ROLES)})"
                )
            roles.setdefault(words[0], set()).update(words[1:])
    keys = {}
    for key, held in roles.items():
        if {"sovereign", "force_overflow"} <= held:
            raise ConfigError(f"API key {api_key_id(key)} is both sovereign and force_overflow")
        keys[key] = ApiKey(api_key_id(key), *(role in held for role in KEY_ROLES))
    return keys


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{where}.{key}' (known: {', '.join(sorted(known))})")
    return cls(**values)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, check: bool = True
) -> Config:
    """Load a profile (a path, or a name under configs/), then env, then explicit overrides.

    overrides use dotted keys: {"engine.model": "...", "server.port": 8001}."""
    data: dict[str, Any] = {}
    profile = "cpu"
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(p.read_text()) or {}
        profile = p.stem
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    top_known = {"engine", "server", "profile", "description", "models"} | _EXTRA_SECTIONS
    for key in data:
        if key not in top_known:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(top_known))})")
    engine_vals = dict(data.get("engine") or {})
    server_vals = dict(data.get("server") or {})
    for key, value in _env_overrides().items():
        _set_dotted(engine_vals, server_vals, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(engine_vals, server_vals, key, value)
    cfg = Config(
        engine=_build(EngineConfig, engine_vals, "engine"),
        server=_build(ServerConfig, server_vals, "server"),
        profile=str(data.get("profile", profile)),
        description=str(data.get("description", "")),
        models=list(data.get("models") or []),
        extra={k: data[k] for k in _EXTRA_SECTIONS if k in data},
    )
    if check:  # check=False: the raw layout, for tools that change it before it is served (planner)
        validate(cfg)
    return cfg


def _set_dotted(engine_vals: dict, server_vals: dict, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    target = {"engine": engine_vals, "server": server_vals}.get(section)
    if target is None or not name:
        raise ConfigError(f"unknown config key '{key}'")
    target[name] = value


def _env_overrides() -> dict[str, Any]:
    """GLM_SERVE_ENGINE__MAX_NUM_SEQS=8 -> engine.max_num_seqs = 8 (typed from the dataclass field)."""
    out: dict[str, Any] = {}
    types = {f"engine.{f.name}": f.type for f in fields(EngineConfig)}
    types |= {f"server.{f.name}": f.type for f in fields(ServerConfig)}
    for name, raw in os.environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        dotted = f"{section}.{key}"
        if dotted not in types:
            raise ConfigError(f"unknown config key '{dotted}' from environment variable {name}")
        out[dotted] = _coerce(raw, str(types[dotted]))
    return out


def _coerce(raw: str, type_name: str) -> Any:
    if "bool" in type_name:
        return raw.lower() in ("1", "true", "yes", "on")
    if "int" in type_name and raw.lstrip("-").isdigit():
        return int(raw)
    if "float" in type_name:
        try:
            return float(raw)
        except ValueError:
            return raw
    if "list" in type_name:
        return [s for s in raw.split(",") if s]
    return raw


def validate(cfg: Config) -> None:
    e = cfg.engine
    if e.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"engine.dtype must be float32, bfloat16 or float16, not {e.dtype!r}")
    if e.block_size <= 0 or e.block_size & (e.block_size - 1):
        raise ConfigError(f"engine.block_size must be a power of two, not {e.block_size}")
    if e.max_num_seqs < 1:
        raise ConfigError("engine.max_num_seqs must be >= 1")
    if e.max_num_batched_tokens < 1:
        raise ConfigError("engine.max_num_batched_tokens must be >= 1")
    if e.backend not in ("native", "vllm"):
        raise ConfigError(f"engine.backend must be native or vllm, not {e.backend!r}")
    if not 0.0 < e.memory_fraction <= 1.0:
        raise ConfigError("engine.memory_fraction must be in (0, 1]")
    _validate_hardware(e)
    if e.backend == "native" and (e.pipeline_parallel_size > 1 or e.nodes > 1 or e.data_parallel_size > 1):
        raise ConfigError(
            "engine.pipeline_parallel_size, engine.nodes and engine.data_parallel_size must be 1 with backend "
            "native: the native engine runs tensor parallelism on one host; use backend vllm across nodes"
        )
    _validate_sections(cfg)


def _validate_sections(cfg: Config) -> None:
    """The overflow and usage sections, parsed by their own modules (imported here: they import this one)."""
    from server.overflow import parse_overflow_config
    from server.routing import parse_routing_config
    from server.usage import parse_usage_config

    parse_overflow_config(cfg.extra.get("overflow"))
    parse_usage_config(cfg.extra.get("usage"))
    parse_routing_config(cfg.extra.get("routing"))


WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "w8a8", "w4a8")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")
QUANTIZED_WEIGHTS = ("fp8", "w8a8", "w4a8")


def _validate_hardware(e: EngineConfig) -> None:
    """Impossible combinations of device, accelerator, dtypes, kernels and parallel layout."""
    from backends.devices import device_class, get_accelerator

    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "expert_parallel_size",
                 "nodes", "devices_per_node"):  # fmt: skip
        if getattr(e, name) < 1:
            raise ConfigError(f"engine.{name} must be >= 1, not {getattr(e, name)}")
    world = e.tensor_parallel_size * e.pipeline_parallel_size * e.data_parallel_size
    if e.device != "cpu" and world > e.nodes * e.devices_per_node:  # CPU ranks are processes on one host
        raise ConfigError(
            f"engine.tensor_parallel_size x pipeline_parallel_size x data_parallel_size = {world} devices, but "
            f"engine.nodes x engine.devices_per_node = {e.nodes * e.devices_per_node}"
        )
    if e.expert_parallel_size not in (1, e.tensor_parallel_size * e.data_parallel_size):
        raise ConfigError(
            f"engine.expert_parallel_size must be 1 or tensor_parallel_size x data_parallel_size "
            f"= {e.tensor_parallel_size * e.data_parallel_size} (experts spread over the TP x DP devices), "
            f"not {e.expert_parallel_size}"
        )
    try:
        device = device_class(e.device)
    except ValueError as exc:
        raise ConfigError(f"engine.device: {exc}") from None
    if e.dtype not in device.supported_dtypes:
        raise ConfigError(f"engine.dtype {e.dtype} is not supported on {e.device}")
    if e.attention_kernel != "auto" and e.attention_kernel not in device.attention_kernels:
        raise ConfigError(
            f"engine.attention_kernel {e.attention_kernel!r} is not available on {e.device} "
            f"(available: auto, {', '.join(device.attention_kernels)})"
        )
    if e.weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(
            f"engine.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {e.weight_dtype!r}"
        )
    if e.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"engine.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {e.kv_cache_dtype!r}"
        )
    if e.backend == "native" and e.weight_dtype in QUANTIZED_WEIGHTS:
        raise ConfigError(
            f"engine.weight_dtype {e.weight_dtype} needs backend vllm: the native engine has no quantized kernels"
        )
    if e.backend == "native" and e.kv_cache_dtype == "fp8":
        raise ConfigError(
            "engine.kv_cache_dtype fp8 needs backend vllm: the native engine keeps KV in its dtype"
        )
    if e.accelerator is None:  # the planner then cannot size the devices (it says so); the engine runs
        return
    try:
        acc = get_accelerator(e.accelerator)
    except ValueError as exc:
        raise ConfigError(f"engine.accelerator: {exc}") from None
    if acc.device != e.device:
        raise ConfigError(
            f"engine.accelerator {acc.name} is a {acc.device} device, but engine.device is {e.device}"
        )
    weight = e.dtype if e.weight_dtype == "auto" else e.weight_dtype
    if weight not in acc.weight_dtypes and weight in QUANTIZED_WEIGHTS:
        raise ConfigError(
            f"engine.weight_dtype {weight} has no kernels on {acc.name} (it has {', '.join(acc.weight_dtypes)})"
        )
    if e.kv_cache_dtype == "fp8" and "fp8" not in acc.kv_cache_dtypes:
        raise ConfigError(
            f"engine.kv_cache_dtype {e.kv_cache_dtype} is not available on {acc.name} "
            f"(it has {', '.join(acc.kv_cache_dtypes)})"
        )
    if e.backend == "vllm" and acc.vllm_plugin is None:
        raise ConfigError(
            f"engine.backend vllm: {acc.name} has no vLLM build (vllm-mlu supports only devices newer than MLU370); "
            "use backend native"
        )
