"""vLLM's offline throughput on the workload of benchmarks/throughput.py, when vLLM is importable.

    python benchmarks/vllm_peer.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 \
        --output-len 100:1024 --max-model-len 2048 --output-json vllm.json

The same flags as throughput.py give the same prompts and output lengths (its `make_workload`, draw for
draw) and the same sampling parameters; vLLM runs dummy (random) weights at the shape's transformers
config, prefix caching off, EOS ignored (with --structured-outputs: the tokenizer's EOS honoured, as
throughput.py honours it). vLLM is not a dependency of jaxllm: on the GPU machine it comes
from the wheel kit described in benchmarks/NOTES.md ("vLLM beside jaxllm").
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import SCHEMAS, make_workload, parse_range, write_result  # noqa: E402


# A checkpoint's quantization_config for the methods vLLM's dummy loader can only build from a config:
# AutoAWQ's GEMM format at the group size of jaxllm's random-weight int4 (models/quant.py, INT4_GROUP).
CHECKPOINT_QUANTIZATION = {"awq": dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm")}


def hf_config_folder(model_shape: str, dtype: str, quantization: str | None = None) -> str:
    """A folder holding the transformers config.json of a jaxllm model shape (what vLLM's dummy load reads),
    with a quantization_config for CHECKPOINT_QUANTIZATION's methods."""
    from transformers import AutoConfig

    from jaxllm.models.shapes import model_shape_config

    c = model_shape_config(model_shape, dtype)
    fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                  tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
                  torch_dtype=dtype, architectures=[c.architecture])
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        fields["rope_scaling"] = dict(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                                      high_freq_factor=rs.high_freq_factor,
                                      original_max_position_embeddings=rs.original_max_position_embeddings)
    model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}.get(c.architecture, "llama")
    if model_type == "mixtral":  # Mixtral's experts are intermediate_size wide
        fields.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                      intermediate_size=c.moe_intermediate_size)
    elif model_type == "qwen3_moe":  # every layer sparse
        fields.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                      moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[])
    if quantization in CHECKPOINT_QUANTIZATION:
        fields["quantization_config"] = CHECKPOINT_QUANTIZATION[quantization]
    folder = tempfile.mkdtemp(prefix=f"vllm-{model_shape}-")
    AutoConfig.for_model(model_type, **fields).save_pretrained(folder)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", required=True, help="qwen3-0.6b, llama3-8b, ... (jaxllm.models.shapes)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=parse_range, default=(128, 128), help="N or LO:HI (uniform)")
    ap.add_argument("--output-len", type=parse_range, default=(64, 64), help="N or LO:HI (uniform)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--quantization", "-q", default=None,
                    help="fp8: W8A8 quantized at load, as jaxllm's flag; awq: int4 dummy weights from an AWQ "
                         "quantization_config (vLLM picks its kernel: awq_marlin where it runs)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--structured-outputs", default="off", choices=["off", "none", "json"],
                    help="as throughput.py: json constrains request i to its SCHEMAS[i % 4] (EOS honoured)")
    ap.add_argument("--tokenizer", default=None,
                    help="a tokenizer folder (structured outputs need one: grammars and EOS come from it)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of the whole workload")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as e:
        raise SystemExit(f"vllm_peer.py needs vLLM importable ({e}); see benchmarks/NOTES.md, 'vLLM beside jaxllm'")

    from jaxllm.models.shapes import model_shape_config

    vocab = model_shape_config(args.model_shape).vocab_size
    prompts, output_lens = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
    # A method in the config.json is left to vLLM to resolve (naming "awq" would force its slower non-Marlin
    # kernel over awq_marlin).
    in_config = args.quantization in CHECKPOINT_QUANTIZATION
    optional = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    quantization=None if in_config else args.quantization, tokenizer=args.tokenizer)
    if args.structured_outputs != "off" and args.tokenizer is None:
        # Without one vLLM has no EOS and would run every request to max_tokens, where jaxllm stops at EOS.
        raise SystemExit("--structured-outputs needs --tokenizer (a folder: grammars are over its vocabulary, and "
                         "EOS is its EOS, as throughput.py takes it)")
    start = time.perf_counter()
    # Prefix caching off, as in throughput.py: a repeat must not reuse the previous run's KV blocks.
    # runner="generate": with a tokenizer, vLLM would otherwise take a config-only folder for a pooling model.
    llm = LLM(model=hf_config_folder(args.model_shape, args.dtype, args.quantization), load_format="dummy",
              runner="generate", skip_tokenizer_init=args.tokenizer is None, kv_cache_dtype=args.kv_cache_dtype,
              dtype=args.dtype, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
              enable_prefix_caching=False, **{k: v for k, v in optional.items() if v is not None})
    init_s = time.perf_counter() - start
    try:  # the method vLLM resolved (awq -> awq_marlin on Hopper), for the record
        resolved_quantization = llm.llm_engine.vllm_config.model_config.quantization
    except AttributeError:
        resolved_quantization = None
    # vLLM's top_k off is 0 or -1 depending on the version; 0 is accepted by current ones.
    def sampling(i: int, n: int):
        if args.structured_outputs == "off":
            return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=n,
                                  ignore_eos=True, detokenize=False)
        so = StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]) if args.structured_outputs == "json" else None
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=n,
                              detokenize=False, structured_outputs=so)

    params = [sampling(i, n) for i, n in enumerate(output_lens)]
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(requests[:16], params[:16], use_tqdm=False)  # warm-up, not timed
    num_in = sum(map(len, prompts))
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        num_out = sum(len(o.outputs[0].token_ids) for o in outputs)  # with EOS honoured, what was generated
        assert args.structured_outputs != "off" or num_out == sum(output_lens)
        runs.append({"elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(num_out / elapsed, 1),
                     "total_tokens_per_s": round((num_in + num_out) / elapsed, 1)})
        print(f"vllm {vllm.__version__}: {num_out / elapsed:,.1f} output tok/s", flush=True)
    result = {"benchmark": "throughput", "engine": "vllm", "vllm_version": vllm.__version__,
              "torch_version": torch.__version__, "device": torch.cuda.get_device_name(0),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "model": args.model_shape, "args": vars(args), "init_s": round(init_s, 2),
              "vllm_quantization": resolved_quantization,
              "runs": runs, "vllm": runs[-1]}
    write_result(result, args.output_json, f"vllm-{args.model_shape}-{result['date'][:10]}.json")
    return result


if __name__ == "__main__":
    main()
