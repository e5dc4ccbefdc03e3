"""Accelerator profiles (configs/*.yaml): they load and validate, every value says where it comes from, the
models they list fit (or not) as the planner computes, and impossible combinations are errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backends.planner import check_fits, plan_profile_models
from server.config import CONFIG_DIR, ConfigError, load_config

PROFILES = [
    "cpu",
    "nvidia-h100",
    "nvidia-h200",
    "nvidia-a100",
    "ascend-910b",
    "cambricon-mlu370",
    "cambricon-mlu590",
]
KEY_VALUE = re.compile(r"^\s*(- )?[A-Za-z_][\w.-]*:\s*\S")


def test_the_profile_set():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.profile == name and cfg.description and cfg.models
    if name != "cpu":
        assert cfg.engine.accelerator and cfg.engine.device != "cpu"


@pytest.mark.parametrize("name", PROFILES)
def test_every_value_carries_a_comment(name):
    for number, line in enumerate((CONFIG_DIR / f"{name}.yaml").read_text().splitlines(), 1):
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if KEY_VALUE.match(line) or line.lstrip().startswith("- "):
            assert " #" in line, f"{name}.yaml:{number} has a value without a source comment: {line.strip()}"


@pytest.mark.parametrize("name", PROFILES)
def test_listed_models_fit_as_the_profile_says(name):
    for entry, result in plan_profile_models(name):
        assert result.fits == entry["fits"], f"{name}: {entry} -> {result.reason or 'fits'}"


def test_cpu_profile_keeps_its_values():
    e = load_config("cpu").engine
    assert (e.backend, e.device, e.dtype, e.block_size, e.kv_cache_bytes) == (
        "native",
        "cpu",
        "float32",
        16,
        2 << 30,
    )
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len, e.attention_kernel) == (
        64,
        2048,
        8192,
        "cpu",
    )


def test_ascend_profile_offers_both_backends():
    cfg = load_config("ascend-910b")
    assert cfg.engine.backend == "vllm" and cfg.engine.weight_dtype == "w8a8"
    native = {
        k: int(v) if v.isdigit() else v
        for k, v in (i.split("=") for i in cfg.extra["notes"]["pick_native"].split())
    }
    native_cfg = load_config("ascend-910b", native)
    assert native_cfg.engine.backend == "native" and native_cfg.engine.weight_dtype == "bfloat16"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


def test_a_device_profile_without_accelerator_loads_but_cannot_be_planned(tmp_path):
    cfg = load_config(_write(tmp_path, "engine:\n  device: npu\n  dtype: bfloat16\n"))
    with pytest.raises(ValueError, match="engine.accelerator is not set.*ascend-910b-64gb"):
        check_fits(cfg, "GLM-4.7-Flash")


def test_unknown_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="engine.max_batch"):
        load_config(_write(tmp_path, "engine:\n  max_batch: 8\n"))
    with pytest.raises(ConfigError, match="'hardware'"):
        load_config(_write(tmp_path, "hardware: h100\n"))


IMPOSSIBLE = [
    ("nvidia-a100", {"engine.weight_dtype": "fp8"}, "engine.weight_dtype"),  # no FP8 kernels on SM80 here
    ("ascend-910b", {"engine.weight_dtype": "fp8"}, "engine.weight_dtype"),  # no FP8 on Ascend
    ("ascend-910b", {"engine.kv_cache_dtype": "fp8"}, "engine.kv_cache_dtype"),
    ("cambricon-mlu370", {"engine.backend": "vllm"}, "engine.backend"),  # vllm-mlu excludes MLU370
    (
        "cambricon-mlu370",
        {"engine.weight_dtype": "w8a8"},
        "engine.weight_dtype",
    ),  # native: no quantized kernels
    ("cpu", {"engine.kv_cache_dtype": "fp8"}, "engine.kv_cache_dtype"),
    ("nvidia-h200", {"engine.tensor_parallel_size": 16}, "engine.tensor_parallel_size"),  # 16 GPUs on 1 x 8
    (
        "nvidia-h200",
        {"engine.expert_parallel_size": 4},
        "engine.expert_parallel_size",
    ),  # must be 1 or tp x dp
    ("nvidia-h200", {"engine.accelerator": "ascend-910b-64gb"}, "engine.accelerator"),
    ("nvidia-h200", {"engine.accelerator": "b300"}, "engine.accelerator"),
    ("nvidia-h200", {"engine.attention_kernel": "ascend"}, "engine.attention_kernel"),
    ("nvidia-h200", {"engine.device": "tpu"}, "engine.device"),
    ("ascend-910b", {"engine.backend": "native"}, "engine.weight_dtype"),  # W8A8 is vllm-ascend only
    ("nvidia-h100", {"engine.nodes": 0}, "engine.nodes"),
    (
        "cpu",
        {"engine.pipeline_parallel_size": 2},
        "engine.pipeline_parallel_size",
    ),  # native: one host, TP only
    ("nvidia-h100", {"engine.weight_dtype": "int3"}, "engine.weight_dtype"),
]


@pytest.mark.parametrize(("profile", "overrides", "key"), IMPOSSIBLE)
def test_impossible_combinations_name_the_key(profile, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(profile, overrides)
