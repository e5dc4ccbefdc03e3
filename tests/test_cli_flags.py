"""`glm-serve serve` flags with vLLM's names: each sets one config key (table-driven), vLLM's dotted
--speculative-config form, engine-arg passthrough, and flags the native backend refuses."""

from __future__ import annotations

import pytest

from server.cli import main, parse_args
from server.cli_flags import config_from_args, expand_dotted, human_int
from server.config import ConfigError

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
# (profile, flags, dotted key, value)
FLAG_CASES = [
    ("cpu", ["-tp", "1"], "engine.tensor_parallel_size", 1),
    ("nvidia-h200", ["-pp", "1", "-dp", "1"], "engine.pipeline_parallel_size", 1),
    ("nvidia-h200", ["--enable-expert-parallel"], "engine.expert_parallel_size", 8),
    ("nvidia-h200", ["-tp", "4", "-dp", "2", "--enable-expert-parallel"], "engine.expert_parallel_size", 8),
    ("cpu", ["--max-model-len", "4k"], "engine.max_model_len", 4000),
    ("cpu", ["--max-model-len", "4K"], "engine.max_model_len", 4096),
    ("cpu", ["--max-num-seqs", "8"], "engine.max_num_seqs", 8),
    ("cpu", ["--max-num-batched-tokens", "512"], "engine.max_num_batched_tokens", 512),
    ("nvidia-h200", ["--gpu-memory-utilization", "0.85"], "engine.memory_fraction", 0.85),
    ("nvidia-h200", ["--kv-cache-dtype", "fp8_ds_mla"], "engine.kv_cache_dtype", "fp8_ds_mla"),
    ("nvidia-h200", ["--dtype", "half"], "engine.dtype", "float16"),
    ("cpu", ["--no-enable-prefix-caching"], "engine.enable_prefix_caching", False),
    ("cpu", ["--backend", "vllm"], "engine.backend", "vllm"),
    ("cpu", ["--generation-config", "vllm"], "engine.generation_config", "vllm"),
    ("cpu", ["/models/m"], "engine.model", "/models/m"),
    ("cpu", ["--served-model-name", "a", "b", "c"], "server.served_model_aliases", ["b", "c"]),
    ("cpu", ["--api-key", "k1", "k2"], "server.api_keys", ["k1", "k2"]),
    ("cpu", ["--chat-template", "t.jinja"], "server.chat_template", "t.jinja"),
    ("cpu", ["--tool-call-parser", "glm45"], "server.tool_call_parser", "glm45"),
    ("cpu", ["--reasoning-parser", "glm45"], "server.reasoning_parser", "glm45"),
    ("cpu", ["--port", "18100", "--host", "0.0.0.0"], "server.port", 18100),
    ("cpu", ["--set", "overflow.enabled=true"], "overflow.enabled", True),
    (
        "nvidia-h200",
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'],
        "vllm.speculative_config",
        NGRAM,
    ),
    (
        "nvidia-h200",
        ["--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens=3"],
        "vllm.speculative_config",
        NGRAM,
    ),
    (  # the native engine speculates too: the same flag sets its own key
        "cpu",
        ["--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens=3"],
        "engine.speculative_config",
        NGRAM,
    ),
    ("nvidia-h200", ["--quantization", "fp8"], "vllm.quantization", "fp8"),
    ("nvidia-h200", ["--enforce-eager", "--trust-remote-code"], "vllm.enforce_eager", True),
    ("nvidia-h200", ["--max-logprobs", "7"], "vllm.max_logprobs", 7),
    ("nvidia-h200", ["--disable-custom-all-reduce"], "vllm.disable_custom_all_reduce", True),
    ("nvidia-h200", ["--set", "vllm.swap_space=8"], "vllm.swap_space", 8),
]


def configure(profile: str, flags: list[str]):
    args, extra = parse_args(["serve", "--config", profile, *flags])
    return config_from_args(args, extra)


def value_of(cfg, key: str):
    section, *path = key.split(".")
    node = {"engine": cfg.engine, "server": cfg.server}.get(section) or cfg.extra[section]
    for name in path:
        node = node[name] if isinstance(node, dict) else getattr(node, name)
    return node


@pytest.mark.parametrize(("profile", "flags", "key", "value"), FLAG_CASES, ids=lambda v: str(v))
def test_flag_sets_its_key(profile, flags, key, value):
    cfg = configure(profile, flags)
    assert value_of(cfg, key) == value
    assert cfg.sources[key] != "default" and not cfg.sources[key].startswith("profile")


REFUSED = [  # (profile, flags, message)
    (
        "cpu",
        ["--speculative-config", '{"method": "ngram", "n": 2}'],
        "speculative_config.*n is not supported",
    ),
    ("cpu", ["--quantization", "fp8"], "vllm.quantization (--quantization) is a vLLM engine argument"),
    ("cpu", ["--enforce-eager"], "needs engine.backend vllm"),
    ("cpu", ["--kv-cache-dtype", "fp8_e4m3"], "engine.kv_cache_dtype fp8_e4m3 needs backend vllm"),
    ("cpu", ["-pp", "2"], "engine.pipeline_parallel_size"),
    ("cpu", ["--tool-call-parser", "hermes"], "known: glm45, glm47"),
    (
        "nvidia-h200",
        ["--speculative-config", '{"num_speculative_tokens": 3}'],
        "expected a mapping with a method",
    ),
    ("cpu", ["a", "--model", "b"], "two models given"),
]


@pytest.mark.parametrize(("profile", "flags", "message"), REFUSED, ids=lambda v: str(v))
def test_refused_flags_name_the_reason(profile, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        configure(profile, flags)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--dtype", "auto"])
    assert info.value.code == 2 and "name the dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--speculative-config", "{not json"])
    assert info.value.code == 2


def test_dotted_flags_become_one_json_flag():
    argv = [
        "m",
        "--speculative-config.method",
        "mtp",
        "--compilation-config.pass_config.fuse=true",
        "-tp",
        "8",
    ]
    assert expand_dotted(argv) == [
        "m", "-tp", "8",
        "--speculative-config", '{"method": "mtp"}',
        "--compilation-config", '{"pass_config": {"fuse": true}}',
    ]  # fmt: skip


@pytest.mark.parametrize(("text", "value"), [("32768", 32768), ("32k", 32000), ("32K", 32768), ("1m", 10**6)])
def test_human_readable_lengths(text, value):
    assert human_int(text) == value
