"""GLM-4.7-Flash (model_type glm4_moe_lite): MLA attention (mla.py) over the latent cache, MoE (moe.py)."""

from __future__ import annotations

from backends.models.mla import MlaCausalLM


class Glm4MoeLiteForCausalLM(MlaCausalLM):
    pass
