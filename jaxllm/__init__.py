"""jaxllm: LLM inference and serving in pure JAX.

    from jaxllm import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
"""

from __future__ import annotations

import logging

from jaxllm.beam_search import BeamSearchOutput, BeamSearchSequence
from jaxllm.llm import LLM
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.pooler import PoolerConfig
from jaxllm.pooling_outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                    EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput, ScoringOutput,
                                    ScoringRequestOutput)
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import (BeamSearchParams, GuidedDecodingParams, RequestOutputKind, SamplingParams,
                                    StructuredOutputsParams)

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "GuidedDecodingParams",
           "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "Logprob", "BeamSearchOutput", "BeamSearchSequence", "generate", "PoolingParams", "PoolerConfig",
           "PoolingOutput", "PoolingRequestOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "ClassificationOutput",
           "ClassificationRequestOutput", "ScoringOutput", "ScoringRequestOutput"]
__version__ = "0.1.0"

logging.getLogger("jaxllm").addHandler(logging.NullHandler())


def _reserve_device_pool() -> None:
    """JAX's GPU memory pool at 95% of each device's memory (JAX's own default is 75%), set before its GPU
    backend starts: `gpu_memory_utilization` is a share of the device's memory, as in vLLM, and at 0.9 it
    would not fit in a 75% pool (engine.kv_cache_room). Left alone when the application set its own."""
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(DEVICE_POOL_FRACTION))


DEVICE_POOL_FRACTION = 0.95
_reserve_device_pool()


def _enable_compilation_cache() -> None:
    """A persistent compilation cache, so that a second start skips compiling (JAXLLM_COMPILATION_CACHE=""
    turns it off). Left alone when the application set its own."""
    import os

    import jax

    path = os.environ.get("JAXLLM_COMPILATION_CACHE", os.path.expanduser("~/.cache/jaxllm/xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


_enable_compilation_cache()

_llms: dict = {}


def generate(prompts, sampling_params: SamplingParams | None = None, *, model: str | None = None,
             use_tqdm: bool = False, **sampling_kwargs) -> list[RequestOutput]:
    """The short form: `jaxllm.generate("The capital of France is", max_tokens=8)`.

    Keyword arguments other than `model` and `use_tqdm` build a SamplingParams (when none is given).
    The engine for each model is built once and reused by later calls."""
    if sampling_params is not None and sampling_kwargs:
        raise TypeError("pass either sampling_params or sampling keyword arguments, not both")
    if sampling_params is None:
        sampling_params = SamplingParams(**sampling_kwargs)
    if model not in _llms:
        _llms[model] = LLM(model)
    return _llms[model].generate(prompts, sampling_params, use_tqdm=use_tqdm)
