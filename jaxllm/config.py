"""Frozen configs: the model's (from a HF config.json or GGUF metadata) and the engine's.

Both are hashable so they can be static arguments of jitted steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from jaxllm.models.registry import SUPPORTED_ARCHITECTURES, architecture_of, model_module


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent rope scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of a decoder-only model. The fields past `dtype` are the features some
    families use; their defaults are the Llama family's (and leave its programs unchanged)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the epsilon of every norm, RMSNorm or LayerNorm
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # compute and weight dtype: float32 | bfloat16 | float16
    hidden_act: str = "silu"  # silu | gelu | gelu_tanh | relu
    # Sliding-window attention: each query sees the last `sliding_window` positions (its own included),
    # on the layers that `layer_types` marks "sliding_attention". layer_types empty: every layer slides,
    # and nothing but the mask depends on it (Mistral; the engine may then drop a window no query exceeds).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None
    attn_scale: float | None = None  # None: head_dim ** -0.5
    rope_local_theta: float | None = None  # Gemma 3's sliding layers rotate with their own base
    # Mixture of experts (num_experts > 0): top-k routing over experts of moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (with a sigmoid gate)
    # The checkpoint's per-layer (k_scale, v_scale) for an FP8 KV cache (vLLM's FP8 checkpoints); empty: 1.0.
    kv_cache_scales: tuple[tuple[float, float], ...] = ()
    # Flags only one family reads, as sorted (name, value) pairs: see `option`.
    options: tuple[tuple[str, object], ...] = ()

    def option(self, name: str, default=None):
        """A family-specific flag (OPT's do_layer_norm_before, Falcon's parallel_attn, ...)."""
        return dict(self.options).get(name, default)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of float32, bfloat16, float16")
        if self.hidden_act not in ("silu", "gelu", "gelu_tanh", "relu"):
            raise ValueError(f"hidden_act={self.hidden_act!r} must be one of silu, gelu, gelu_tanh, relu")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be None or >= 1")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad or (self.layer_types and len(self.layer_types) != self.num_layers):
            raise ValueError(f"layer_types={self.layer_types!r} must hold num_layers={self.num_layers} entries, "
                             "each 'sliding_attention' or 'full_attention'")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")

    @property
    def all_layers_window(self) -> int | None:
        """The sliding window when every attention layer has it, else None. Only then can the KV blocks
        that fall out of the window be freed: a full-attention layer (Gemma 2 and 3 mix them in) reads
        every position of the context."""
        if self.sliding_window is None or "full_attention" in self.layer_types:
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def model_config_from_hf(hf: dict, dtype: str | None = None) -> ModelConfig:
    """Build a ModelConfig from the dict of a Hugging Face config.json: the fields every family shares
    here, the architecture's own by its module's `config_from_hf` (jaxllm/models/registry.py)."""
    arch = architecture_of(hf)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if dtype in (None, "auto"):
        dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(hf.get("torch_dtype") or hf.get("dtype"), "float32")
    common = dict(architecture=arch, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, dtype=dtype)
    return ModelConfig(**common, **model_module(arch).config_from_hf(hf))


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, Llama 3 scaling or None) from `rope_theta`/`rope_scaling` or transformers 5's
    `rope_parameters`; any other scaling type is refused by name."""
    rope_scaling = None
    rs = hf.get("rope_scaling") or (hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else None)
    rope_theta = hf.get("rope_theta")
    if isinstance(rs, dict):
        rope_theta = rope_theta or rs.get("rope_theta")
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, llama3")
    return float(rope_theta or 10000.0), rope_scaling


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs, named and defaulted as vLLM's. Validated at construction."""

    max_model_len: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None  # explicit KV pool size; None sizes it from memory
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True  # schedule and launch step N+1 before reading step N's results
    seed: int = 0
    max_logprobs: int = 20  # -1: no limit (as vLLM)
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) | "fp8" | "fp8_e4m3" (kv_cache.py)
    tensor_parallel_size: int = 1  # devices one replica's weights and KV cache are sharded over (jaxllm/sharding.py)
    data_parallel_size: int = 1  # engine replicas over disjoint device groups (jaxllm/data_parallel.py)
    # vLLM's --reasoning-parser (entrypoints/reasoning_parsers.py): structured outputs start after the reasoning
    reasoning_parser: str | None = None
    token_buckets: tuple[int, ...] = field(default=())  # filled in by __post_init__ when empty
    seq_buckets: tuple[int, ...] = field(default=())

    def __post_init__(self):
        def need(cond, name, value, what):
            if not cond:
                raise ValueError(f"{name}={value!r}: {what}")

        need(isinstance(self.max_model_len, int) and self.max_model_len >= 1, "max_model_len", self.max_model_len, "must be a positive integer")
        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size, "must be a power of two from 1 to 128")
        need(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be a positive integer")
        need(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= self.max_num_seqs,
             "max_num_batched_tokens", self.max_num_batched_tokens, f"must be an integer >= max_num_seqs ({self.max_num_seqs})")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        need(self.num_gpu_blocks is None or self.num_gpu_blocks >= 1, "num_gpu_blocks", self.num_gpu_blocks, "must be None or >= 1")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                 "must be a positive integer")
        need(self.max_logprobs >= -1, "max_logprobs", self.max_logprobs, "must be >= 0, or -1 for no limit")
        need(self.kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"), "kv_cache_dtype", self.kv_cache_dtype,
             "is not supported; supported: auto, fp8, fp8_e4m3")
        need(self.tensor_parallel_size == 1 or self.kv_cache_dtype == "auto", "kv_cache_dtype", self.kv_cache_dtype,
             f"is not supported with tensor_parallel_size={self.tensor_parallel_size} (jaxllm shards a 16-bit "
             "KV cache only); use 'auto', or tensor_parallel_size=1")
        if not self.enable_chunked_prefill:
            need(self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens", self.max_num_batched_tokens,
                 f"must be >= max_model_len ({self.max_model_len}) when chunked prefill is off")
        if not self.token_buckets:
            object.__setattr__(self, "token_buckets", pow2_buckets(8, self.max_num_batched_tokens))
        if not self.seq_buckets:
            # Never a bucket of one: XLA on the CPU copies the whole cache in a one-token step (11 s instead of
            # 0.04 s for SmolLM2's 1 GiB cache); buckets are array sizes, so 2 is fine even when max_num_seqs is 1.
            object.__setattr__(self, "seq_buckets", pow2_buckets(2, max(2, self.max_num_seqs)))
        need(self.token_buckets[-1] >= self.max_num_batched_tokens, "token_buckets", self.token_buckets,
             f"largest must be >= max_num_batched_tokens ({self.max_num_batched_tokens})")
        need(self.seq_buckets[-1] >= self.max_num_seqs, "seq_buckets", self.seq_buckets,
             f"largest must be >= max_num_seqs ({self.max_num_seqs})")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def fine_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two and 1.5x powers of two from lo up to hi (and hi): padding wastes at most a third."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        out.extend([b * 3 // 2] if b * 3 // 2 < hi and b % 2 == 0 else [])
        b *= 2
    out.append(hi)
    return tuple(sorted(set(out)))
