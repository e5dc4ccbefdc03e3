"""The causal-LM skeleton of the GLM MoE models (glm4_moe, glm4_moe_lite, glm_moe_dsa): embedding, decoder
layers (moe.py), final norm and LM head, and the multi-token-prediction layer (mtp.py) when speculative
decoding with method mtp asks for it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from backends.models.common import RMSNorm, load_checkpoint
from backends.models.moe import DecoderLayer, StepState
from backends.models.mtp import MtpLayer
from backends.parallel import ParallelLMHead, VocabParallelEmbedding
from glm_kernels.backend import AttentionContext

log = logging.getLogger(__name__)


class GlmCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head. Subclasses build each layer's attention and say what
    each layer's KV cache holds (kv_cache_specs; the attention backend allocates it).

    Multi-token-prediction (MTP) layers, which GLM checkpoints store as layers num_hidden_layers.., are
    skipped at load unless add_mtp_layer() made room for the first (speculative decoding with method mtp:
    mtp.py); the KV-cache layouts then count one layer more."""

    def __init__(self, config, make_attention: Callable[[int], nn.Module]):
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_attention(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else ParallelLMHead(config.vocab_size, config.hidden_size)
        self.make_attention = make_attention
        self.mtp = None  # MtpLayer, with add_mtp_layer()

    def add_mtp_layer(self) -> None:
        """Build the checkpoint's MTP layer (before load_weights) for speculative decoding."""
        if not getattr(self.config, "num_nextn_predict_layers", 0):
            raise ValueError("the model has no MTP layer (num_nextn_predict_layers is 0): use method ngram")
        self.mtp = MtpLayer(self.config, self.num_layers, self.make_attention(self.num_layers))

    @property
    def num_kv_layers(self) -> int:
        """Layers with a KV cache: the decoder layers, and the MTP layer when built (the last one)."""
        return len(self.layers) + (self.mtp is not None)

    def forward(self, input_ids, positions, kv_caches, attn: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        step = StepState()
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, attn, step)
        return self.norm(x)

    def logits_layer(self) -> VocabParallelEmbedding:
        """The vocabulary rows logits are computed with: the embedding when tied, else lm_head."""
        return self.embed_tokens if self.tie else self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.logits_layer().logits(hidden)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        skipped_mtp = load_checkpoint(self, named_tensors, self.num_layers, self.tie, self.mtp is not None)
        if skipped_mtp:
            log.info("skipped %d tensors of the MTP layer(s) (no speculative decoding)", skipped_mtp)
