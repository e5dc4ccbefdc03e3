"""GLM's multi-token-prediction (MTP) layer, as vLLM's DeepSeek-V3 / GLM-4.5 MTP modules define it: the
checkpoint's layer num_hidden_layers, used as the drafter of speculative decoding.

At position p it takes the embedding of the token at p + 1 (zeroed at position 0) and the target model's
final hidden state at p, normalizes each (enorm, hnorm), projects their concatenation back to the hidden
size (eh_proj), runs one decoder layer of the target's kind over its own KV cache, and normalizes the result
(shared_head.norm): logits over it predict the token at p + 2, and it is the hidden state the next draft
step takes in place of the target's. The embedding and the output head are the target's (the checkpoint's
copies, layers.N.embed_tokens and layers.N.shared_head.head, are the same tensors in GLM checkpoints)."""

from __future__ import annotations

import torch

from backends.models.common import RMSNorm
from backends.models.moe import DecoderLayer, StepState
from backends.parallel import Linear
from glm_kernels.backend import AttentionContext


class MtpLayer(DecoderLayer):
    """The decoder layer's modules keep their checkpoint names (self_attn, mlp, ...) beside the MTP's own."""

    def __init__(self, config, layer: int, attention: torch.nn.Module):
        super().__init__(config, layer, attention)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden, bias=False)
        self.shared_head = torch.nn.Module()
        self.shared_head.norm = RMSNorm(hidden, config.rms_norm_eps)

    def predict(self, embeds, hidden, positions, kv_cache, attn: AttentionContext) -> torch.Tensor:
        """The normalized hidden state at each position (logits over it: the token two positions on)."""
        embeds = torch.where(positions[:, None] == 0, torch.zeros_like(embeds), embeds)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        x = super().forward(x, positions, kv_cache, attn, StepState())
        return self.shared_head.norm(x)
