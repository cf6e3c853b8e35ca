"""Encoder models (BERT, RoBERTa / XLM-RoBERTa) as pure functions over a packed, ragged batch.

Encoders are neither paged nor autoregressive: a step packs many whole sequences one after another
into one fixed-size token array, with a segment id per token (-1 for padding), and attention is
bidirectional within a segment (models/encoder_attention.py). Sequences sit back to back, moved only so
that none crosses an attention chunk (pooling_layout.py); the rest of the step is padding.

The layers are post-LayerNorm (BERT's): x = LN(x + attn(x)); x = LN(x + mlp(x)). RoBERTa differs only
in its position ids, which start at padding_idx + 1 (the caller passes them already offset).
`*ForSequenceClassification` heads are the same on both: the first token's hidden state through
dense -> tanh -> linear (BERT calls the first half its pooler, RoBERTa its classification head).

Einsum letters: t/s query/key token, e embedding (hidden), f ffn, h head, d head_dim, l label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.models.encoder_attention import encoder_attention

ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "RobertaModel",
                         "RobertaForMaskedLM", "RobertaForSequenceClassification", "XLMRobertaModel",
                         "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification")
_MODEL_TYPES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}


@dataclass(frozen=True)
class EncoderConfig:
    """The shape and numerics of a BERT-family encoder (hashable: a static argument of jitted steps)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_offset: int = 0  # RoBERTa: padding_idx + 1; a token at position p reads position_embeddings[p + offset]
    hidden_act: str = "gelu"  # "gelu" (erf) | "gelu_new" / "gelu_pytorch_tanh" (tanh approximation)
    num_labels: int = 0  # > 0: a *ForSequenceClassification head
    pad_token_id: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.architecture not in ENCODER_ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}: supported encoders: {', '.join(ENCODER_ARCHITECTURES)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported: gelu, gelu_new, gelu_pytorch_tanh")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of float32, bfloat16, float16")
        if self.max_model_len < 1:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} leaves no room after "
                             f"position_offset={self.position_offset}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_model_len(self) -> int:
        """The longest sequence the position table holds."""
        return self.max_position_embeddings - self.position_offset

    @property
    def is_classifier(self) -> bool:
        return self.num_labels > 0

    def replace(self, **changes) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)


def encoder_config_from_hf(hf: dict, dtype: str | None = None) -> EncoderConfig:
    """An EncoderConfig from the dict of a Hugging Face config.json."""
    archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type", ""), str(hf.get("model_type")))]
    arch = archs[0]
    roberta = arch.startswith(("Roberta", "XLMRoberta"))
    if dtype in (None, "auto"):
        dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(hf.get("torch_dtype") or hf.get("dtype"), "float32")
    num_labels = 0
    if arch.endswith("ForSequenceClassification"):
        num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else (1 if roberta else 0))
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r}: only 'absolute' is supported")
    return EncoderConfig(
        architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], max_position_embeddings=int(hf["max_position_embeddings"]),
        type_vocab_size=int(hf.get("type_vocab_size", 2)), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        position_offset=pad + 1 if roberta else 0, hidden_act=hf.get("hidden_act", "gelu"), num_labels=num_labels,
        pad_token_id=pad, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderLayerWeights:
    """All layers' weights, stacked on a leading axis L = num_layers; matrices are [in, out]."""

    wqkv: jax.Array  # [L, e, 3 * e]  (q | k | v)
    bqkv: jax.Array  # [L, 3 * e]
    wo: jax.Array  # [L, e, e]
    bo: jax.Array  # [L, e]
    attn_ln_w: jax.Array  # [L, e]
    attn_ln_b: jax.Array  # [L, e]
    w_in: jax.Array  # [L, e, f]
    b_in: jax.Array  # [L, f]
    w_out: jax.Array  # [L, f, e]
    b_out: jax.Array  # [L, e]
    mlp_ln_w: jax.Array  # [L, e]
    mlp_ln_b: jax.Array  # [L, e]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClassifierWeights:
    """dense -> tanh -> out on the first token (BERT's pooler + classifier, RoBERTa's classification head)."""

    dense_w: jax.Array  # [e, e]
    dense_b: jax.Array  # [e]
    out_w: jax.Array  # [e, l]
    out_b: jax.Array  # [l]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderWeights:
    word_emb: jax.Array  # [v, e]
    pos_emb: jax.Array  # [max_position_embeddings, e]
    type_emb: jax.Array  # [type_vocab_size, e]
    emb_ln_w: jax.Array  # [e]
    emb_ln_b: jax.Array  # [e]
    layers: EncoderLayerWeights
    classifier: ClassifierWeights | None = None


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def forward(
    params: EncoderWeights,
    token_ids: jax.Array,  # [T] int32
    type_ids: jax.Array,  # [T] int32 (token_type_ids; 0 for single sentences)
    positions: jax.Array,  # [T] int32, position within its sequence (0-based, before RoBERTa's offset)
    segment_ids: jax.Array,  # [T] int32, which packed sequence a token belongs to; -1 for padding
    config: EncoderConfig,
    chunk: int | None = None,  # static: no sequence crosses a multiple of it (pooling_layout.py); None: T
    attention: str = "jnp",  # static: "jnp", "loop" or "cudnn" (models/encoder_attention.py)
) -> jax.Array:  # [T, e] the last layer's hidden states
    T = token_ids.shape[0]
    nh, hd, e = config.num_heads, config.head_dim, config.hidden_size
    eps = config.layer_norm_eps
    gelu_approx = config.hidden_act != "gelu"
    x = (params.word_emb[token_ids] + params.pos_emb[positions + config.position_offset]
         + params.type_emb[type_ids])  # [T, e]
    x = layer_norm(x, params.emb_ln_w, params.emb_ln_b, eps)

    def layer(x, w):
        with jax.named_scope("attention"):
            qkv = x @ w.wqkv + w.bqkv  # [T, 3e]
            q, k, v = (a.reshape(T, nh, hd) for a in jnp.split(qkv, 3, axis=-1))
            o = encoder_attention(q, k, v, segment_ids, hd**-0.5, chunk, attention)  # [T, h, d]
            x = layer_norm(x + o.reshape(T, e) @ w.wo + w.bo, w.attn_ln_w, w.attn_ln_b, eps)
        with jax.named_scope("mlp"):
            h = jax.nn.gelu(x @ w.w_in + w.b_in, approximate=gelu_approx)
            x = layer_norm(x + h @ w.w_out + w.b_out, w.mlp_ln_w, w.mlp_ln_b, eps)
        return x, None

    x, _ = jax.lax.scan(layer, x, params.layers)
    return x


def classify(params: EncoderWeights, first_hidden: jax.Array) -> jax.Array:
    """The sequence-classification head on each sequence's first token: [S, e] -> float32 logits [S, l]."""
    c = params.classifier
    h = jnp.tanh(first_hidden @ c.dense_w + c.dense_b)
    return (h @ c.out_w + c.out_b).astype(jnp.float32)


def init_random_weights(config: EncoderConfig, key: jax.Array, scale: float = 0.02) -> EncoderWeights:
    """Random weights at a real encoder's shape (benchmarks)."""
    L, e, f = config.num_layers, config.hidden_size, config.intermediate_size
    dt = jnp.dtype(config.dtype)
    ks = iter(jax.random.split(key, 12))

    def rnd(*shape):
        return jax.random.normal(next(ks), shape, dt) * jnp.asarray(scale, dt)

    ones, zeros = (lambda *s: jnp.ones(s, dt)), (lambda *s: jnp.zeros(s, dt))
    layers = EncoderLayerWeights(
        wqkv=rnd(L, e, 3 * e), bqkv=zeros(L, 3 * e), wo=rnd(L, e, e), bo=zeros(L, e), attn_ln_w=ones(L, e),
        attn_ln_b=zeros(L, e), w_in=rnd(L, e, f), b_in=zeros(L, f), w_out=rnd(L, f, e), b_out=zeros(L, e),
        mlp_ln_w=ones(L, e), mlp_ln_b=zeros(L, e))
    classifier = None
    if config.is_classifier:
        classifier = ClassifierWeights(dense_w=rnd(e, e), dense_b=zeros(e), out_w=rnd(e, config.num_labels),
                                       out_b=zeros(config.num_labels))
    return EncoderWeights(word_emb=rnd(config.vocab_size, e), pos_emb=rnd(config.max_position_embeddings, e),
                          type_emb=rnd(config.type_vocab_size, e), emb_ln_w=ones(e), emb_ln_b=zeros(e),
                          layers=layers, classifier=classifier)
