"""The engine on the GPU against HF transformers on the same GPU (run on a CUDA machine).

1. float32: greedy tokens of a random-weight Qwen3-shaped model through the whole engine (scheduler,
   paged cache, chunked prefill, reference attention) equal HF's greedy tokens, token for token.
2. bfloat16: logits of a ragged prefill + decode through the Pallas kernels agree with HF's bf16 logits
   within bf16 tolerance.

    python tests/gpu/check_engine.py --log $OUT/check_engine.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

# torch shares this process's GPU: JAX's pool stays at its default 75% (importing jaxllm would make it 95%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.config import model_config_from_hf  # noqa: E402
from jaxllm.kv_cache import AttentionMetadata, KVCache  # noqa: E402
from jaxllm.loader.hf import weights_from_state  # noqa: E402
from jaxllm.models import llama  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
from throughput import git_commit  # noqa: E402


def hf_model(dtype):
    config = transformers.Qwen3Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                                      max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.to(dtype=dtype, device="cuda").eval(), config


def ours(model, config, dtype: str):
    cfg = model_config_from_hf(config.to_dict() | {"architectures": ["Qwen3ForCausalLM"]}, dtype=dtype)
    state = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
    return cfg, weights_from_state(cfg, state)


def check_greedy_float32(report):
    # XLA's default float32 matmul on a GPU is TF32; torch's is not. Compare true float32 with true float32.
    jax.config.update("jax_default_matmul_precision", "highest")
    model, config = hf_model(torch.float32)
    cfg, params = ours(model, config, "float32")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 4096, n).tolist() for n in (5, 17, 64, 130, 300)]
    llm = LLM.from_params(params, cfg, None, max_num_seqs=8, max_num_batched_tokens=128, max_model_len=512,
                          num_gpu_blocks_override=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False), use_tqdm=False)
    results = []
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ids = torch.tensor([p], device="cuda")
            hf = model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                attention_mask=torch.ones_like(ids))[0, len(p):].tolist()
        mine = o.outputs[0].token_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(mine, hf)) if a != b), None)
        results.append({"prompt_len": len(p), "equal": mine == hf, "first_diff": first_diff})
    report["greedy_float32"] = results
    jax.config.update("jax_default_matmul_precision", None)
    return all(r["equal"] for r in results)


def check_logits_bf16(report):
    """bf16 error is judged against an fp32 reference, beside HF's own bf16 error on the same inputs."""
    ref_model, _ = hf_model(torch.float32)
    model, config = hf_model(torch.bfloat16)
    cfg, params = ours(model, config, "bfloat16")
    rng = np.random.default_rng(2)
    lens = [37, 200, 1]
    prompts = [rng.integers(0, 4096, n).tolist() for n in lens]
    bs, num_blocks = 16, 128
    cache = KVCache.create(cfg, num_blocks, bs)
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(lens), 16), np.int32)
    for i in range(len(lens)):
        tables[i] = perm[i * 16:(i + 1) * 16]
    # Prefill all three in one ragged call.
    tok = np.concatenate(prompts).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    seq = np.repeat(np.arange(len(lens)), lens)
    slots = (tables[seq, pos // bs] * bs + pos % bs).astype(np.int32)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    md = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=np.array(lens, np.int32),
                           query_start_loc=qsl, logits_indices=(qsl[1:] - 1).astype(np.int32))
    logits, cache = jax.jit(llama.forward, static_argnames=("config", "decode_only"),
                            compiler_options=llama.step_compiler_options())(
        params, tok, pos, cache, md, config=cfg)
    # One decode step through the decode kernel.
    nxt = np.asarray(jnp.argmax(logits, -1), np.int32)
    dpos = np.array(lens, np.int32)
    md2 = AttentionMetadata(slot_mapping=(tables[np.arange(3), dpos // bs] * bs + dpos % bs).astype(np.int32),
                            block_tables=tables, seq_lens=dpos + 1, query_start_loc=np.arange(4, dtype=np.int32),
                            logits_indices=np.arange(3, dtype=np.int32))
    logits2, cache = jax.jit(llama.forward, static_argnames=("config", "decode_only"),
                            compiler_options=llama.step_compiler_options())(
        params, nxt, dpos, cache, md2, config=cfg, decode_only=True)
    ours_err, hf_err = [], []
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([p + [int(nxt[i])]], device="cuda")
            ref = ref_model(ids).logits[0].float().cpu().numpy()
            hf = model(ids).logits[0].float().cpu().numpy()
        for got, j in ((np.asarray(logits[i], np.float32), -2), (np.asarray(logits2[i], np.float32), -1)):
            ours_err.append(rel(got, ref[j]))
            hf_err.append(rel(hf[j], ref[j]))
    report["logits_bf16_rel_err_vs_fp32"] = {"jaxllm": ours_err, "hf_bf16": hf_err}
    return max(ours_err) <= max(1.5 * max(hf_err), 1e-2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_engine.json")
    args = ap.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join(sys.argv)}
    ok = {}
    for name, fn in (("greedy_float32", check_greedy_float32), ("logits_bf16", check_logits_bf16)):
        try:
            ok[name] = fn(report)
        except Exception as e:  # report and go on: one broken check must not hide the others
            report[name + "_error"] = repr(e)
            ok[name] = False
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    with open(args.log, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if all(ok.values()) else 1)


if __name__ == "__main__":
    main()
