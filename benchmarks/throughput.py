"""Offline throughput, in the shape of vLLM's benchmark_throughput, with HF transformers on the same workload.

    python benchmarks/throughput.py --num-prompts 64 --input-len 128 --output-len 64 --compare-hf generate
    python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 \
        --output-len 100:1024 --compare-hf generate_batch

Prompts are random token ids (vLLM's `--dataset random`); EOS is ignored so every request produces exactly
its output length. `--structured-outputs json` constrains request i to the i % 4-th of a handful of JSON
schemas (vLLM's structured outputs workload, in the shape of its json-mode benchmark): a request then ends
when its object is complete, so throughput counts the output tokens actually generated. Run it once with
and once without (`none`, EOS still honoured: the tokenizer's, as with `json`) on the same prompts to compare. jaxllm is warmed up on a short run first (compilation is reported, not timed); HF gets
the same courtesy. Results go to benchmarks/results/ as JSON with device, date, jax version and commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# Schemas of the structured workload: objects of a few fields, strings bounded so a request ends.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer"},
                                      "capital": {"type": "boolean"}},
     "required": ["city", "population", "capital"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "maxItems": 6}, "score": {"type": "number"}},
     "required": ["tags", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                      "reason": {"type": "string", "maxLength": 64}},
     "required": ["answer", "reason"], "additionalProperties": False},
]


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_workload(num_prompts, input_len, output_len, vocab_size, seed):
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = input_len, output_len
    prompts = [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(ilo, ihi))] for _ in range(num_prompts)]
    outputs = [rng.randint(olo, ohi) for _ in range(num_prompts)]
    return prompts, outputs


def device_name() -> str:
    """The GPU's kind, or on a CPU its model: CPU figures (and ratios against torch) move with the host."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu: {cpu_model()}"
    return getattr(d, "device_kind", d.platform)


def cpu_model() -> str:
    """/proc/cpuinfo's model name, and whether it has AVX-512 (which XLA's and torch's CPU kernels use)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")
    return name + (", AVX-512" if " avx512f" in info else "")


def git_commit() -> str:
    """$JAXLLM_GIT_COMMIT when set (the device copy's .git, where present, is not the tree that runs),
    else HEAD's short hash, with "+dirty" where tracked files differ from HEAD (so a record can't name a
    commit whose code it did not run)."""
    if os.environ.get("JAXLLM_GIT_COMMIT"):
        return os.environ["JAXLLM_GIT_COMMIT"]
    try:
        def git(*args):
            return subprocess.check_output(["git", *args], text=True, stderr=subprocess.DEVNULL,
                                           cwd=os.path.dirname(RESULTS)).strip()

        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                       else "")
    except Exception:
        return "unknown"


def write_result(result: dict, path: str | None, default_name: str) -> None:
    """Write a benchmark's JSON: to `path`, or to benchmarks/results/<default_name>. A default name that is
    taken (a record behind the README, say) gets the commit and the time appended instead: a run replaces a
    record only when asked to with an explicit path."""
    os.makedirs(RESULTS, exist_ok=True)
    if path is None:
        path = os.path.join(RESULTS, default_name)
        if os.path.exists(path):
            stem, ext = os.path.splitext(path)
            path = f"{stem}-{git_commit()}-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}{ext}"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def build_llm(args):
    kwargs = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  async_scheduling=not args.no_async_scheduling,
                  max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                  enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype)
    if args.model_shape:
        from jaxllm.models.shapes import model_shape_config, random_weights

        config = model_shape_config(args.model_shape, dtype=args.dtype if args.dtype != "auto" else "bfloat16",
                                    **args.shape_overrides)
        params = random_weights(config, jax.random.PRNGKey(args.seed), args.quantization)
        tokenizer = None
        if args.structured_outputs != "off":  # a tokenizer (the default model's, for any vocabulary) for its EOS
            from jaxllm.loader import default_model_path, load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer or default_model_path())
            # A grammar ends with the tokenizer's EOS (as vLLM takes it), not the shape's, which may lie past
            # a smaller tokenizer's vocabulary; `none` stops at the same EOS, so that it is the base of `json`
            # and vLLM (which takes EOS from the same tokenizer) stops where jaxllm does.
            config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
        return LLM.from_params(params, config, tokenizer, **kwargs), config
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, **kwargs)
    return llm, llm.llm_engine.model_config


def run_jaxllm(llm, prompts, output_lens, structured: str = "random", temperature=0.0, top_p=1.0, top_k=0):
    """(seconds, compiles during the run, output tokens generated). `structured`: "random" (EOS ignored,
    exact lengths), "none" (EOS honoured) or "json" (request i constrained to SCHEMAS[i % 4])."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)

    def params(i, n):
        if structured == "random":
            return SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, **sampling)
        so = StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]) if structured == "json" else None
        return SamplingParams(max_tokens=n, detokenize=False, structured_outputs=so, **sampling)

    runner = llm.llm_engine.runner
    compiled_before = len(runner.compiled_buckets)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(i, n) for i, n in enumerate(output_lens)],
                        use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = [len(o.outputs[0].token_ids) for o in outs]
    if structured == "random":
        assert generated == output_lens
    return elapsed, len(runner.compiled_buckets) - compiled_before, sum(generated)


def hf_model(args, config):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model_shape:
        from transformers import AutoConfig

        hf = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, rope_theta=config.rope_theta,
                  tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=config.max_position_embeddings)
        model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral",
                      "Qwen3MoeForCausalLM": "qwen3_moe"}.get(config.architecture, "llama")
        if config.num_experts:
            hf.update(num_local_experts=config.num_experts, num_experts=config.num_experts,
                      num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
                      moe_intermediate_size=config.moe_intermediate_size)
            if model_type == "mixtral":
                hf["intermediate_size"] = config.moe_intermediate_size
        hf_config = AutoConfig.for_model(model_type, **hf)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        from jaxllm.loader import default_model_path

        path = args.model or default_model_path()
        if path.endswith(".gguf"):
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                         dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), device


def run_hf_generate(model, device, prompts, output_lens, batch_size):
    """HF's static batching: batches of `batch_size`, left-padded, every sequence runs to the batch's longest output."""
    import torch

    start = time.perf_counter()
    produced = 0
    for i in range(0, len(prompts), batch_size):
        batch, lens = prompts[i:i + batch_size], output_lens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max(lens), min_new_tokens=max(lens), pad_token_id=0)
        produced += sum(lens)  # only the tokens each request asked for count
        assert out.shape[1] - width == max(lens)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, produced


def run_hf_generate_batch(model, prompts, output_lens, max_batch_tokens):
    """HF's continuous batching; it takes one max_new_tokens for all, so every request gets the mean length."""
    from transformers import GenerationConfig

    n = int(round(float(np.mean(output_lens))))
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1)
    kwargs = {}
    try:  # transformers >= 5.20 takes the batch size in its own config
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens)
    except ImportError:
        gen.max_batch_tokens = max_batch_tokens
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False, **kwargs)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.generated_tokens) for o in outs.values())


def compare_hf(args, config, llm, prompts, output_lens, result):
    """HF transformers on the same prompts and output lengths, in the same run."""
    model, device = hf_model(args, config)
    ours = result["jaxllm"]["output_tokens_per_s"]
    if args.hf_num_prompts:
        prompts, output_lens = prompts[:args.hf_num_prompts], output_lens[:args.hf_num_prompts]
        result["hf_num_prompts"] = len(prompts)
    if args.compare_hf in ("generate", "both"):
        bsz = args.hf_batch_size or llm.llm_engine.config.max_num_seqs
        run_hf_generate(model, device, prompts[:bsz], [2] * len(prompts[:bsz]), bsz)  # warm-up
        hf_s, produced = run_hf_generate(model, device, prompts, output_lens, bsz)
        hf = result["hf_generate"] = {"batch_size": bsz, "elapsed_s": round(hf_s, 3),
                                      "output_tokens_per_s": round(produced / hf_s, 1)}
        hf["jaxllm_ratio"] = round(ours / hf["output_tokens_per_s"], 2)
        print(f"HF generate (static batch {bsz}): {hf['output_tokens_per_s']:.1f} output tok/s"
              f"  -> jaxllm x{hf['jaxllm_ratio']:.2f}")
    if args.compare_hf in ("generate_batch", "both"):
        hf_s, produced = run_hf_generate_batch(model, prompts, output_lens, args.hf_max_batch_tokens)
        hf = result["hf_generate_batch"] = {"elapsed_s": round(hf_s, 3), "output_tokens_per_s": round(produced / hf_s, 1),
                                            "max_batch_tokens": args.hf_max_batch_tokens}
        hf["jaxllm_ratio"] = round(ours / hf["output_tokens_per_s"], 2)
        print(f"HF generate_batch (continuous): {hf['output_tokens_per_s']:.1f} output tok/s"
              f"  -> jaxllm x{hf['jaxllm_ratio']:.2f}")


def arg_parser() -> argparse.ArgumentParser:
    """This benchmark's flags; profile_step.py builds its engine from their defaults too."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the default model)")
    ap.add_argument("--model-shape", default=None,
                    help="random weights at a real shape: qwen3-0.6b, llama3-8b, mixtral-8x7b, qwen3-30b-a3b, ...")
    ap.add_argument("--shape-overrides", type=json.loads, default={},
                    help='JSON of ModelConfig fields replacing the shape\'s (a small run: \'{"num_layers": 2}\')')
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", "-q", default=None,
                    help="fp8, int8 or awq (int4, groups of 128, zero points) quantize --model-shape's random weights; "
                         "with --model, fp8 or int8 quantize a float checkpoint, else a checkpoint's method")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    ap.add_argument("--dataset", default="random", choices=["random"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=parse_range, default=(128, 128), help="N or LO:HI (uniform)")
    ap.add_argument("--output-len", type=parse_range, default=(64, 64), help="N or LO:HI (uniform)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--compare-hf", default="none", choices=["none", "generate", "generate_batch", "both"],
                    help="HF transformers in this process, on the same GPU: in what JAX's pool leaves (5%% of the "
                         "device unless XLA_PYTHON_CLIENT_MEM_FRACTION is set lower)")
    ap.add_argument("--hf-batch-size", type=int, default=None, help="static batch for HF generate (default: max_num_seqs)")
    ap.add_argument("--hf-max-batch-tokens", type=int, default=8192)
    ap.add_argument("--hf-num-prompts", type=int, default=None,
                    help="run HF on the first N prompts only (for peers too slow for the whole workload)")
    ap.add_argument("--structured-outputs", default="off", choices=["off", "none", "json"],
                    help="json: each request constrained to one of 4 JSON schemas (EOS honoured); none: the same "
                         "workload unconstrained; off: EOS ignored, exact output lengths (the default)")
    ap.add_argument("--tokenizer", default=None,
                    help="with --model-shape and --structured-outputs json or none: a tokenizer folder or .gguf, "
                         "for grammars and EOS (default: the default model's)")
    ap.add_argument("--output-json", default=None)
    return ap


def main(argv=None):
    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxllm").setLevel(logging.INFO)

    t0 = time.perf_counter()
    llm, config = build_llm(args)
    load_s = time.perf_counter() - t0
    prompts, output_lens = make_workload(args.num_prompts, args.input_len, args.output_len, config.vocab_size, args.seed)
    if args.max_model_len is None and max(map(len, prompts)) + max(output_lens) > llm.llm_engine.config.max_model_len:
        raise SystemExit("a request is longer than max_model_len: raise --max-model-len")

    warm_n = min(len(prompts), llm.llm_engine.config.max_num_seqs)
    t0 = time.perf_counter()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    mode = "random" if args.structured_outputs == "off" else args.structured_outputs
    run_jaxllm(llm, prompts[:warm_n], [min(n, 8) for n in output_lens[:warm_n]], mode, **sampling)
    warmup_s = time.perf_counter() - t0
    from jaxllm.engine import StepTimes

    llm.llm_engine.step_times = StepTimes()
    llm.llm_engine.runner.prepare_seconds = 0.0
    elapsed, compiles, total_out = run_jaxllm(llm, prompts, output_lens, mode, **sampling)
    total_in = sum(map(len, prompts))
    result = {
        "benchmark": "throughput", "device": device_name(), "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "commit": git_commit(), "command": " ".join(sys.argv),
        "model": args.model_shape or args.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "dtype": config.dtype, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "sampling": sampling, "structured_outputs": args.structured_outputs,
        "output_tokens": total_out, "max_num_seqs": llm.llm_engine.config.max_num_seqs,
        "max_num_batched_tokens": llm.llm_engine.config.max_num_batched_tokens,
        "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2), "compiles_during_run": compiles,
        "async_scheduling": llm.llm_engine.config.async_scheduling, "step_times": llm.llm_engine.step_times.summary(),
        # A window on every layer frees the blocks that leave it: fewer preemptions for long contexts.
        "sliding_window": config.sliding_window, "num_kv_blocks": llm.llm_engine.kv_cache_manager.num_blocks,
        "num_preemptions": getattr(getattr(llm.llm_engine, "scheduler", None), "num_preemptions", None),
        "prepare_ms_per_step": round(llm.llm_engine.runner.prepare_seconds * 1e3
                                     / max(llm.llm_engine.step_times.steps, 1), 3),
        "scan_unroll": os.environ.get("JAXLLM_SCAN_UNROLL", "1"),
        "unroll_max_tokens": os.environ.get("JAXLLM_UNROLL_MAX_TOKENS", ""), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxllm": {"elapsed_s": round(elapsed, 3), "requests_per_s": round(args.num_prompts / elapsed, 3),
                   "output_tokens_per_s": round(total_out / elapsed, 1),
                   "total_tokens_per_s": round((total_in + total_out) / elapsed, 1)},
    }
    print(f"jaxllm: {result['jaxllm']['requests_per_s']:.2f} req/s, "
          f"{result['jaxllm']['output_tokens_per_s']:.1f} output tok/s, "
          f"{result['jaxllm']['total_tokens_per_s']:.1f} total tok/s "
          f"({compiles} compiles during the run; warm-up {warmup_s:.1f}s)")
    print(f"step times: {result['step_times']}, prepare {result['prepare_ms_per_step']} ms/step")

    if args.compare_hf != "none":
        try:
            compare_hf(args, config, llm, prompts, output_lens, result)
        except Exception as e:  # noqa: BLE001  (record why the peer did not run; keep our figure)
            result["hf_error"] = repr(e)[:2000]
            print(f"HF comparison failed: {e!r}")

    os.makedirs(RESULTS, exist_ok=True)
    write_result(result, args.output_json,
                 f"throughput-{result['backend']}-{(args.model_shape or 'default')}-{result['date'][:10]}.json")
    return result


if __name__ == "__main__":
    main()
