"""The flags of `glm-serve serve` and `glm-serve config show`: vLLM's names for what users copy from
recipes, each mapped to one config key (so a flag is an override like any other, and errors name it).

A flag whose key is under engine.* or server.* works on both backends where the key means something; a
flag that sets a vllm.* key (--speculative-config, --quantization, --enforce-eager, ...) is a vLLM engine
argument, refused by the native backend. Other `--some-engine-arg VALUE` flags pass through to vLLM as
vllm.some_engine_arg, checked against vLLM's EngineArgs; `--speculative-config.method mtp` is vLLM's
dotted form of `--speculative-config '{"method": "mtp"}'`."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any

import yaml

from server.config import CONFIG_DIR, Config, ConfigError, load_config

DTYPE_ALIASES = {"half": "float16", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "float32": "float32"}  # fmt: skip
_HUMAN = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def human_int(text: str) -> int:
    """vLLM's --max-model-len form: 32768, 32k (32000), 32K (32768)."""
    match = _HUMAN.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a number like 32768, 32k or 32K, not {text!r}")
    return int(float(match[1]) * _SCALE[match[2]])


def dtype_name(text: str) -> str:
    if text not in DTYPE_ALIASES:
        known = ", ".join(DTYPE_ALIASES)
        raise argparse.ArgumentTypeError(
            f"{text!r}: name the dtype ({known}); the planner sizes memory with it"
        )
    return DTYPE_ALIASES[text]


def json_mapping(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text!r}")
    return value


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every flag whose dest is a dotted config key; None (not given) leaves the key to env/profile."""

    def flag(*names: str, key: str, **kwargs: Any) -> None:
        p.add_argument(*names, dest=key, default=None, **kwargs)

    p.add_argument("model_tag", nargs="?", help="the model (as `vllm serve MODEL`); same as --model")
    p.add_argument(
        "--config", default=str(CONFIG_DIR / "cpu.yaml"), help="profile: a YAML path or a name in configs/"
    )
    flag("--model", key="engine.model", help="a Hugging Face-format model directory (default: the profile's)")
    flag(
        "--backend",
        key="engine.backend",
        choices=["native", "vllm"],
        help="the engine (default: the profile's)",
    )
    flag("--host", key="server.host", help="address to listen on (default: the profile's, 127.0.0.1)")
    flag("--port", key="server.port", type=int, help="port to listen on (default: the profile's, 8000)")
    flag(
        "--api-key", key="server.api_keys", nargs="+", help="accepted API keys (replaces the configured list)"
    )
    flag(
        "--api-key-file", key="server.api_key_file", help="file: one API key per line, optionally with roles"
    )
    p.add_argument("--served-model-name", nargs="+", help="model ids clients use; the first is reported")
    flag(
        "--chat-template", key="server.chat_template", help="a Jinja chat template file replacing the model's"
    )
    flag(
        "--tool-call-parser", key="server.tool_call_parser", help="glm45 | glm47 (default: from the template)"
    )
    flag("--reasoning-parser", key="server.reasoning_parser", help="glm45")
    flag("--enable-auto-tool-choice", key="server.enable_auto_tool_choice", action="store_true",
         help="allow tool_choice auto (glm-serve's default; accepted for vLLM command lines)")  # fmt: skip
    flag(
        "--generation-config",
        key="engine.generation_config",
        help="auto | vllm | a directory (sampling defaults)",
    )
    flag("-tp", "--tensor-parallel-size", key="engine.tensor_parallel_size", type=int)
    flag("-pp", "--pipeline-parallel-size", key="engine.pipeline_parallel_size", type=int)
    flag("-dp", "--data-parallel-size", key="engine.data_parallel_size", type=int)
    p.add_argument("--enable-expert-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="spread the experts over tp x dp devices")  # fmt: skip
    flag("--max-model-len", key="engine.max_model_len", type=human_int, help="e.g. 32768, 32k, 32K")
    flag("--max-num-seqs", key="engine.max_num_seqs", type=int)
    flag("--max-num-batched-tokens", key="engine.max_num_batched_tokens", type=int)
    flag("--gpu-memory-utilization", key="engine.memory_fraction", type=float)
    flag(
        "--kv-cache-dtype",
        key="engine.kv_cache_dtype",
        help="auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2, fp8_ds_mla",
    )
    flag("--dtype", key="engine.dtype", type=dtype_name, help="bfloat16, float16 (half), float32 (float)")
    flag("--block-size", key="engine.block_size", type=int)
    flag("--seed", key="engine.seed", type=int)
    flag("--enable-prefix-caching", key="engine.enable_prefix_caching", action=argparse.BooleanOptionalAction)
    flag("--speculative-config", key="vllm.speculative_config", type=json_mapping,
         help='vLLM only: e.g. \'{"method": "mtp", "num_speculative_tokens": 3}\'')  # fmt: skip
    flag("-q", "--quantization", key="vllm.quantization", help="vLLM only: the weights' quantization method")
    flag("--enforce-eager", key="vllm.enforce_eager", action="store_true", help="vLLM only: no CUDA graphs")
    flag("--trust-remote-code", key="vllm.trust_remote_code", action="store_true", help="vLLM only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. overflow.enabled=true or vllm.swap_space=8")  # fmt: skip


def expand_dotted(argv: Sequence[str]) -> list[str]:
    """vLLM's `--speculative-config.method mtp --speculative-config.num_speculative_tokens 3` as one
    `--speculative-config '{"method": "mtp", "num_speculative_tokens": 3}'` (values parsed as YAML)."""
    out: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        head, dot, _ = arg.partition(".")
        if arg.startswith("--") and dot and not head[2:].replace("-", "").isdigit():
            name, eq, value = arg.partition("=")
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            flag, *path = name.split(".")
            node = merged.setdefault(flag, {})
            for part in path[:-1]:
                node = node.setdefault(part.replace("-", "_"), {})
            node[path[-1].replace("-", "_")] = yaml.safe_load(value)
        else:
            out.append(arg)
        i += 1
    for flag, value in merged.items():
        out += [flag, json.dumps(value)]
    return out


def bind_unknown_values(argv: Sequence[str], known: set[str]) -> list[str]:
    """`--unknown-flag VALUE` as `--unknown-flag=VALUE`, so that argparse does not take VALUE for the
    MODEL positional; a flag followed by another flag (or nothing) is a boolean switch."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        unknown = arg.startswith("--") and "=" not in arg and arg not in known
        if unknown and i + 1 < len(argv) and argv[i + 1] not in known and not argv[i + 1].startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def passthrough_flags(extra: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """Leftover `--name value` / `--name=value` / `--flag` arguments as vllm.* keys with their flag."""
    out: dict[str, tuple[Any, str]] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
            value, i = (extra[i + 1], i + 1) if has_value else ("true", i)
        out[f"vllm.{name.replace('-', '_')}"] = (yaml.safe_load(value), f"--{name}")
        i += 1
    return out


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The effective configuration for parsed flags: profile < environment < flags (< --set)."""
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    flag_of = getattr(args, "_flag_names", {})
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            overrides[dest], sources[dest] = value, flag_of.get(dest, dest)
    if args.model_tag:
        if overrides.get("engine.model", args.model_tag) != args.model_tag:
            raise ConfigError(
                f"two models given: {args.model_tag!r} and --model {overrides['engine.model']!r}"
            )
        overrides["engine.model"], sources["engine.model"] = args.model_tag, "MODEL argument"
    if args.served_model_name:
        overrides["server.served_model_name"], *aliases = args.served_model_name
        overrides["server.served_model_aliases"] = aliases
        sources["server.served_model_name"] = sources["server.served_model_aliases"] = "--served-model-name"
    for key, (value, flag) in passthrough_flags(extra).items():
        overrides[key], sources[key] = value, flag
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. engine.max_num_seqs=8")
        overrides[key], sources[key] = value, f"--set {key}"
    if args.enable_expert_parallel is not None:  # a layout of tp x dp devices, known once the rest is merged
        e = load_config(args.config, overrides, check=False, override_sources=sources).engine
        overrides["engine.expert_parallel_size"] = (
            e.tensor_parallel_size * e.data_parallel_size if args.enable_expert_parallel else 1
        )
        sources["engine.expert_parallel_size"] = "--enable-expert-parallel"
    return load_config(args.config, overrides, override_sources=sources)


def remember_flag_names(p: argparse.ArgumentParser) -> None:
    """Errors and `config show` name the flag a value came from: dest -> its longest option string."""
    names = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    p.set_defaults(_flag_names=names)
