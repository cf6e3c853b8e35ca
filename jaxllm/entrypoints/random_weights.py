"""`--model-shape NAME`: random weights at a real model's shape with the default model's tokenizer, for
benchmarks (not a vLLM flag)."""

from __future__ import annotations

from jaxllm.detokenizer import backend_decoder


class _WrappingTokenizer:
    """The default model's tokenizer over a random-weight model of another vocabulary: token ids past its
    vocabulary decode as `id % len(tokenizer)`, so streamed text is never empty (for benchmarks)."""

    backend_tokenizer = None  # the detokenizer must decode through `decode`, which wraps the ids

    def __init__(self, base):
        self._base, self._size = base, len(base)
        self._backend_decode = backend_decoder(base)

    def __getattr__(self, name):
        return getattr(self._base, name)

    def __len__(self):
        return self._size

    def __call__(self, *args, **kwargs):
        return self._base(*args, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs):
        ids = [int(i) % self._size for i in ids] if isinstance(ids, (list, tuple)) else [int(ids) % self._size]
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=skip_special_tokens)
        return self._base.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def random_weights_llm(shape: str, dtype: str, engine_kwargs: dict, tokenizer: str | None = None,
                       quantization: str | None = None):
    import jax

    from jaxllm import LLM
    from jaxllm.loader import default_model_path, load_tokenizer
    from jaxllm.models.quant import RANDOM_WEIGHT_METHODS
    from jaxllm.models.shapes import model_shape_config, random_weights

    if quantization is not None and quantization not in RANDOM_WEIGHT_METHODS:
        raise ValueError(f"--quantization {quantization} needs a checkpoint; random weights take "
                         f"{', '.join(RANDOM_WEIGHT_METHODS)}")
    config = model_shape_config(shape, "bfloat16" if dtype == "auto" else dtype)
    params = random_weights(config, jax.random.PRNGKey(engine_kwargs["seed"]), quantization)
    tokenizer = _WrappingTokenizer(load_tokenizer(tokenizer or default_model_path()))
    return LLM.from_params(params, config, tokenizer, **engine_kwargs)
