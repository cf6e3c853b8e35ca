"""Real models' shapes, for random-weight benchmarks on machines with no checkpoints."""

from __future__ import annotations

from jaxllm.config import ModelConfig, RopeScaling

MODEL_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         eos_token_ids=(2,)),
    "qwen3-0.6b": dict(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                       max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
                       eos_token_ids=(151645,)),
    "qwen2.5-7b": dict(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
                       max_position_embeddings=32768, qkv_bias=True, eos_token_ids=(151645,)),
    "llama3-8b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, eos_token_ids=(128001, 128009)),
    "llama3.1-8b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), eos_token_ids=(128001, 128009)),
    # Every layer slides over the last 4096 positions: blocks that leave the window go back to the pool.
    "mistral-7b-v0.1": dict(architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096,
                            intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                            max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, eos_token_ids=(2,)),
    # Mixture of experts (bf16: Mixtral-8x7B's 46.7B parameters are 93 GB, one H200)
    "mixtral-8x7b": dict(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=14336, norm_topk_prob=True, eos_token_ids=(2,)),
    "qwen3-30b-a3b": dict(architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                          rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          eos_token_ids=(151645,)),
}


def model_shape_config(name: str, dtype: str = "bfloat16", **overrides) -> ModelConfig:
    """The config of a named shape; `overrides` replace fields (e.g. num_layers=2 for a small run)."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return ModelConfig(dtype=dtype, **{**MODEL_SHAPES[name], **overrides})


def init_random_weights(config: ModelConfig, key, scale: float = 0.02):
    """Random weights at `config`'s shape, by its architecture's module (jaxllm/models/registry.py)."""
    from jaxllm.models.registry import model_module

    return model_module(config.architecture).init_random_weights(config, key, scale=scale)


def random_weights(config: ModelConfig, key, quantization: str | None = None):
    """Random weights at `config`'s shape, quantized in memory when `quantization` names one of
    `quant.RANDOM_WEIGHT_METHODS` (random weights have no checkpoint to quantize at load).

    Quantizing on the device leaves the float weights' memory as holes below the quantized ones, and each
    half of the KV cache needs one contiguous buffer: an FP8 Llama-3-8B lost its 16 GiB of float weights to
    a hole the cache could not use. So the quantized weights go to the host and come back into an emptied
    pool, packed at its bottom (8 GiB each way for that model: about a second)."""
    import jax

    params = init_random_weights(config, key)
    if quantization is None:
        return params
    from jaxllm.models.quant import quantize_weights

    params = quantize_weights(params, quantization)  # the float weights are freed here
    host = jax.device_get(params)
    del params
    return jax.device_put(host)


# Encoders (embedding models) at real shapes: all-MiniLM-L6-v2, bge-base-en-v1.5 (BERT) and bge-m3 (XLM-RoBERTa),
# with the pooling their sentence-transformers files declare.
ENCODER_SHAPES: dict[str, dict] = {
    "all-minilm-l6-v2": dict(architecture="BertModel", vocab_size=30522, hidden_size=384, intermediate_size=1536,
                             num_layers=6, num_heads=12, max_position_embeddings=512),
    "bge-base": dict(architecture="BertModel", vocab_size=30522, hidden_size=768, intermediate_size=3072,
                     num_layers=12, num_heads=12, max_position_embeddings=512),
    "bge-m3": dict(architecture="XLMRobertaModel", vocab_size=250002, hidden_size=1024, intermediate_size=4096,
                   num_layers=24, num_heads=16, max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5,
                   position_offset=2, pad_token_id=1),
}
ENCODER_POOLING = {"all-minilm-l6-v2": "MEAN", "bge-base": "CLS", "bge-m3": "CLS"}


def encoder_shape_config(name: str, dtype: str = "float32"):
    from jaxllm.models.bert import EncoderConfig

    if name not in ENCODER_SHAPES:
        raise ValueError(f"unknown encoder shape {name!r}; known: {', '.join(ENCODER_SHAPES)}")
    return EncoderConfig(dtype=dtype, **ENCODER_SHAPES[name])
