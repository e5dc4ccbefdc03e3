"""Model implementations by config.json model_type, imported lazily."""

from __future__ import annotations

import importlib

MODEL_REGISTRY: dict[str, str] = {
    "llama": "backends.models.llama:LlamaForCausalLM",
    "glm4_moe": "backends.models.glm4_moe:Glm4MoeForCausalLM",
    "glm4_moe_lite": "backends.models.glm4_moe_lite:Glm4MoeLiteForCausalLM",
    "glm_moe_dsa": "backends.models.glm_moe_dsa:GlmMoeDsaForCausalLM",
}


def model_class(model_type: str):
    path = MODEL_REGISTRY.get(model_type)
    if path is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the native engine "
            f"(supported: {', '.join(sorted(MODEL_REGISTRY))})"
        )
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
