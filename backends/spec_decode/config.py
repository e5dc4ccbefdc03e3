"""The native engine's speculative decoding settings, read from vLLM's `speculative_config` keys (the
profile's `vllm.speculative_config` or `--speculative-config`). Plain Python: the config layer imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "mtp")
MTP_ALIASES = ("mtp", "deepseek_mtp", "glm4_moe_mtp")  # vLLM's method names for a model's own MTP layer
KEYS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "disable_by_batch_size",
)


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str  # ngram | mtp
    num_speculative_tokens: int  # k: draft tokens proposed per request and step
    prompt_lookup_min: int = 5  # ngram: shortest suffix n-gram looked up (vLLM's default 5)
    prompt_lookup_max: int = 5  # ngram: longest suffix n-gram looked up
    # No drafts in a step whose batch holds more running requests than this: a large batch is compute
    # bound, and verifying drafts costs more than it saves. None: always draft (vLLM's older key name).
    disable_by_batch_size: int | None = None


def parse_speculative_config(
    raw: dict[str, Any] | None, where: str = "speculative_config"
) -> SpeculativeConfig:
    """vLLM's speculative_config mapping as a SpeculativeConfig; ValueError names the bad key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]} is not supported by the native engine (it reads {', '.join(KEYS)})"
        )
    method = raw.get("method")
    if method in MTP_ALIASES:
        method = "mtp"
    if method not in METHODS:
        raise ValueError(
            f"{where}.method must be one of {', '.join(METHODS)} on the native engine, got {method!r}"
        )
    values = {key: raw.get(key) for key in KEYS[1:]}
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
    k = values["num_speculative_tokens"]
    if k is None:
        if method == "ngram":
            raise ValueError(f"{where}.num_speculative_tokens is required with method ngram")
        k = 1  # mtp: vLLM's default, one draft per MTP layer
    low, high = values["prompt_lookup_min"], values["prompt_lookup_max"]
    low, high = low or high or 5, high or low or 5
    if low > high:
        raise ValueError(f"{where}.prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high})")
    return SpeculativeConfig(method, k, low, high, values["disable_by_batch_size"])
