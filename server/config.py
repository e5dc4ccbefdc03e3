"""Typed configuration: a YAML profile, overridden by GLM_SERVE_* environment variables, overridden by
CLI flags. The sections are dataclasses; server/config_schema.py checks every value against its field's
type and names the key, its source and the closest known name in errors. Adding a key is adding a field
(with a `# comment`: docs/configuration.md is generated from it, `python -m server.config_docs`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backends.devices import device_class, get_accelerator
from backends.spec_decode.config import parse_speculative_config
from backends.vllm_args import check_vllm_section
from server import config_schema as schema
from server.agent_apis import parse_agent_apis_config
from server.api_keys import KEY_ROLES, ApiKey, api_key_id
from server.config_schema import ConfigError
from server.overflow import parse_overflow_config
from server.routing import parse_routing_config
from server.usage import parse_usage_config

# The shipped profiles: configs/ beside the packages, in a checkout and in an installed wheel alike
# (pyproject.toml ships it as package data).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(slots=True)
class EngineConfig:
    """How the native engine runs a model."""

    model: str | None = None  # a Hugging Face-format directory; None: the embedded SmolLM2 default
    backend: str = "native"  # native | vllm
    device: str = "cpu"  # cpu | cuda | npu | mlu
    dtype: str = "float32"  # activations: float32 | bfloat16 | float16 (--dtype also takes half, float)
    kv_cache_dtype: str = "auto"  # auto: same as dtype; fp8, fp8_e4m3, fp8_e5m2, fp8_ds_mla: vLLM only
    block_size: int = 16  # tokens per KV-cache block (a power of two)
    kv_cache_bytes: int | None = None  # KV cache size; None: derived from memory_fraction
    memory_fraction: float = 0.9  # of free device memory for weights + KV (GPU/NPU); CPU uses kv_cache_bytes
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes when set (tests use it)
    max_num_seqs: int = 64  # requests in one batch at most
    max_num_batched_tokens: int = 2048  # tokens computed in one step at most (chunked prefill)
    long_prefill_token_threshold: int | None = None  # prefill chunk cap while others wait; None: budget/4
    max_long_partial_prefills: int = 1  # prompts over the threshold prefilled at once; shorter ones pass them
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True  # reuse the KV blocks of a shared prompt prefix
    tensor_parallel_size: int = 1  # devices each layer is split over (-tp)
    pipeline_parallel_size: int = 1  # stages the layers are split into (-pp; vLLM only)
    # 1, or tp x dp: the experts spread over those devices (--enable-expert-parallel)
    expert_parallel_size: int = 1
    attention_kernel: str = "reference"  # a glm_kernels/ name the device offers; "auto": the backend's choice
    # Hardware layout and weight format, read by the memory planner (backends/planner.py) and validate().
    accelerator: str | None = None  # the card sized for, e.g. h200-141gb (backends/devices); None: the host
    weight_dtype: str = "auto"  # auto (= dtype) | bfloat16 | float16 | float32 | fp8 | w8a8 | w4a8
    data_parallel_size: int = 1  # engine replicas; with expert parallelism experts spread over tp x dp
    nodes: int = 1  # hosts the engine spans
    devices_per_node: int = 1  # accelerators per host
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    seed: int = 0  # sampling seed of the engine
    cache_dir: str | None = None  # where the embedded model is dequantized; GLM_SERVE_CACHE_DIR
    # auto: the model directory's generation_config.json gives the sampling defaults (as vLLM's
    # --generation-config auto); vllm: none (the API's own defaults); else a directory holding that file
    generation_config: str = "auto"
    # Speculative decoding of the native engine, with vLLM's speculative_config keys: method (ngram | mtp),
    # num_speculative_tokens, prompt_lookup_min, prompt_lookup_max, disable_by_batch_size. On backend
    # native, --speculative-config and vllm.speculative_config set it. None: no speculation.
    speculative_config: dict[str, Any] | None = None
    # The engine core (scheduler, KV cache, runner, sampler, drafter) in a process of its own, exchanging one
    # message per step with the HTTP process; false: in a thread of the HTTP process (tests, debugging)
    core_process: bool = True


@dataclass(slots=True)
class ServerConfig:
    """The HTTP server: address, API keys and roles, limits, chat template and parsers."""

    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 in containers
    port: int = 8000  # HTTP port (vLLM's default)
    served_model_name: str | None = None  # the model id in responses; None: the model directory's name
    # more model ids requests may use (vLLM's --served-model-name: the names after the first)
    served_model_aliases: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)  # accepted bearer keys; none: no authentication
    api_key_file: str | None = None  # one key per line, optionally followed by roles: `sk-... admin`
    # Roles (KEY_ROLES); a key listed here is also a valid key. Sovereign requests never leave this server.
    sovereign_keys: list[str] = field(default_factory=list)
    force_overflow_keys: list[str] = field(default_factory=list)  # may send `X-Overflow: force` (testing)
    admin_keys: list[str] = field(default_factory=list)  # may read GET /v1/usage
    protect_metrics: bool = False  # /metrics needs an API key too
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    max_queued_requests: int = 256  # waiting sequences (one per prompt and choice); 503 past it
    max_queued_tokens: int = 262144  # waiting prompt tokens (all sequences) past which new work gets 503
    max_prompts_per_request: int = 64  # prompts in one /v1/completions request (400 past it)
    max_sequences_per_request: int = 64  # n x prompts of one request: a quarter of the queue (400 past it)
    max_prompt_tokens_per_request: int = 65536  # prompt tokens of one request, all prompts (400 past it)
    max_concurrent_requests_per_key: int | None = None  # in flight per API key (429 past it); None: no limit
    max_in_flight_requests: int = 512  # requests whose body is read, not yet answered (503 past it)
    max_connections: int = 1024  # open connections, or requests under way (503 + Retry-After past it)
    body_read_timeout_s: float = 30.0  # the whole body must arrive within this (408 past it)
    max_pending_body_bytes: int = 256 * 1024 * 1024  # bodies still arriving, all together (503 past it)
    max_header_bytes: int = 16384  # request line + headers (uvicorn h11_max_incomplete_event_size)
    max_json_depth: int = 64  # nesting of a JSON body (400 past it)
    frontend_workers: int = 2  # threads that render templates and tokenize, off the event loop
    frontend_max_queued: int = 64  # rendering/tokenizing jobs waiting for those threads (503 past it)
    special_tokens_in_content: bool = False  # True: special tokens in messages act as control tokens
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    log_prompts: bool = False  # write prompt text to the log (debugging only)
    chat_template: str | None = None  # a Jinja file (or the template text) replacing the tokenizer's
    tool_call_parser: str | None = None  # glm45 | glm47 (tool-call layout); None: from the chat template
    # glm45: the <think> blocks of GLM-4.5 to GLM-5 (always split; also passed to vLLM's engine)
    reasoning_parser: str | None = None
    # tool_choice "auto" allowed; false: only "none" and named tools (vLLM without --enable-auto-tool-choice)
    enable_auto_tool_choice: bool = True


@dataclass(slots=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    profile: str = "cpu"
    description: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)  # models the profile is known to fit
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # sections owned by other modules (overflow, usage, vllm)
    sources: dict[str, str] = field(default_factory=dict)  # dotted key -> where its value came from


_EXTRA_SECTIONS = ("overflow", "usage", "routing", "vllm", "notes", "agent_apis")


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


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    check: bool = True,
    *,
    environ: dict[str, str] | None = None,
    override_sources: dict[str, str] | None = None,
) -> Config:
    """A profile (a path, or a name under configs/), then the environment, then explicit overrides; each
    source wins over the one before it. Every value is checked against its field's type.

    overrides use dotted keys: {"engine.model": "...", "server.port": 8001} (None: not given);
    override_sources names where each came from (a command-line flag), for errors and `config show`."""
    data, source = _read_profile(path)
    layers = [
        schema.flatten_profile(data, source),
        schema.env_layer(dict(os.environ) if environ is None else environ),
        {
            k: (v, (override_sources or {}).get(k, "override"))
            for k, v in (overrides or {}).items()
            if v is not None
        },
    ]
    values, sources = schema.merge(layers)
    cfg = Config(
        engine=EngineConfig(**schema.nest(values, "engine")),
        server=ServerConfig(**schema.nest(values, "server")),
        profile=str(data.get("profile", Path(path).stem if path else "cpu")),
        description=str(data.get("description", "")),
        models=list(data.get("models") or []),
        extra={
            s: schema.nest(values, s) for s in _EXTRA_SECTIONS if any(k.startswith(s + ".") for k in values)
        },
        sources=sources,
    )
    if check:  # check=False: the raw layout, for tools that change it before it is served (planner)
        validate(cfg)
    return cfg


def _read_profile(path: str | Path | None) -> tuple[dict[str, Any], str]:
    if path is None:
        return {}, schema.DEFAULT
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.exists():
        known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config file not found: {path} (profiles by name: {', '.join(known)})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    return data, f"profile {p}"


def effective_config(cfg: Config) -> list[tuple[str, Any, str]]:
    """(key, value, source) for every key of the schema and every vllm.* argument, secrets redacted:
    what `glm-serve config show` prints and the server logs at start."""
    rows = []
    for path in schema.schema():
        section, _, rest = path.partition(".")
        node: Any = {"engine": cfg.engine, "server": cfg.server}.get(section) or cfg.extra.get(section, {})
        for name in rest.split("."):
            node = node.get(name, _UNSET) if isinstance(node, dict) else getattr(node, name, _UNSET)
        if node is _UNSET:  # a section left to its module's defaults (overflow, usage)
            node = schema.schema()[path].default
        rows.append((path, schema.redacted(path, node), cfg.sources.get(path, schema.DEFAULT)))
    for name, value in cfg.extra.get("vllm", {}).items():
        path = f"vllm.{name}"
        rows.append((path, schema.redacted(path, value), cfg.sources.get(path, schema.DEFAULT)))
    return rows


_UNSET = object()


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


TOOL_CALL_PARSERS = ("glm45", "glm47")  # server/parsers: GLM-4.5/4.6 layout, GLM-4.7/GLM-5 layout
REASONING_PARSERS = ("glm45",)  # <think> blocks of GLM-4.5 to GLM-5 (vLLM's name, used by its recipes)


def _validate_sections(cfg: Config) -> None:
    """The server's parser names, the vllm section, and the overflow, usage, agent_apis and routing
    sections, parsed by their own modules."""
    for key, known in (("tool_call_parser", TOOL_CALL_PARSERS), ("reasoning_parser", REASONING_PARSERS)):
        value = getattr(cfg.server, key)
        if value is not None and value not in known:
            source = cfg.sources.get(f"server.{key}", "default")
            raise ConfigError(
                f"server.{key} {value!r} ({source}) is not a known parser (known: {', '.join(known)})"
            )
    passthrough = cfg.extra.get("vllm", {})
    _native_speculative_config(cfg, passthrough)
    if passthrough and cfg.engine.backend != "vllm":
        name = next(iter(passthrough))
        raise ConfigError(
            f"vllm.{name} ({cfg.sources.get(f'vllm.{name}', 'profile')}) is a vLLM engine argument: it needs "
            f"engine.backend vllm, and the backend is {cfg.engine.backend}"
        )
    if passthrough:
        check_vllm_section(passthrough, cfg.sources)

    parse_overflow_config(cfg.extra.get("overflow"))
    parse_usage_config(cfg.extra.get("usage"))
    parse_agent_apis_config(cfg.extra.get("agent_apis"))
    parse_routing_config(cfg.extra.get("routing"))


def _native_speculative_config(cfg: Config, passthrough: dict[str, Any]) -> None:
    """The native engine speculates too: on backend native, vllm.speculative_config (what
    --speculative-config sets) becomes engine.speculative_config, checked against the keys it reads."""
    e = cfg.engine
    if e.backend == "native" and "speculative_config" in passthrough:
        e.speculative_config = passthrough.pop("speculative_config")
        cfg.sources["engine.speculative_config"] = cfg.sources.get("vllm.speculative_config", "profile")
    if e.speculative_config is None:
        return
    source = cfg.sources.get("engine.speculative_config", "profile")
    if e.backend != "native":
        raise ConfigError(
            f"engine.speculative_config ({source}) is the native engine's; with backend {e.backend} "
            "set vllm.speculative_config (--speculative-config)"
        )
    try:
        spec = parse_speculative_config(e.speculative_config, f"speculative_config ({source})")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if spec.method == "mtp" and e.tensor_parallel_size > 1:
        raise ConfigError(
            f"speculative_config ({source}): method mtp needs tensor_parallel_size 1 on the native engine"
        )


WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "w8a8", "w4a8")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla")
QUANTIZED_WEIGHTS = ("fp8", "w8a8", "w4a8")


def _validate_hardware(e: EngineConfig) -> None:
    """Impossible combinations of device, accelerator, dtypes, kernels and parallel layout."""
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
    if e.backend == "native" and e.kv_cache_dtype.startswith("fp8"):
        raise ConfigError(
            f"engine.kv_cache_dtype {e.kv_cache_dtype} needs backend vllm: the native engine keeps KV in its dtype"
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
    if e.kv_cache_dtype.startswith("fp8") and "fp8" not in acc.kv_cache_dtypes:
        raise ConfigError(
            f"engine.kv_cache_dtype {e.kv_cache_dtype} is not available on {acc.name} "
            f"(it has {', '.join(acc.kv_cache_dtypes)})"
        )
    if e.backend == "vllm" and acc.vllm_plugin is None:
        raise ConfigError(
            f"engine.backend vllm: {acc.name} has no vLLM build (vllm-mlu supports only devices newer than MLU370); "
            "use backend native"
        )
