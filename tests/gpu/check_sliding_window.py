"""Sliding-window models on the GPU (run on a CUDA machine): a random-weight Mistral-shaped model whose
window (256) is much shorter than its sequences, through the whole engine, against HF transformers on the
same GPU, in float32.

1. Greedy tokens equal HF's token for token on prompts that end before, across and far past the window.
2. The KV pool is sized below what the sequences would need without freeing (each would hold all its
   blocks), so the run only fits because blocks that leave the window go back to the pool: no preemption,
   and the peak number of held blocks stays under the window-aware bound.
3. With max_model_len within the window, the engine drops the window (long prefill chunks can then take
   the Mosaic kernel) and gives the same tokens on the short prompt.

    python tests/gpu/check_sliding_window.py --log $OUT/check_sliding_window.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.config import model_config_from_hf  # noqa: E402
from jaxllm.loader.hf import weights_from_state  # noqa: E402
from throughput import git_commit  # noqa: E402

WINDOW, BLOCK, CHUNK, NEW_TOKENS = 256, 16, 256, 48
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script itself
PROMPT_LENS = (100, 300, 1500)


def hf_model():
    config = transformers.MistralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                                        max_position_embeddings=4096, sliding_window=WINDOW, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    model.set_attn_implementation("eager")
    return model.to(device=DEVICE).eval(), config


def hf_greedy(model, prompt):
    with torch.no_grad():
        ids = torch.tensor([prompt], device=DEVICE)
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def run_engine(llm, prompts):
    """Greedy outputs, step by step, with the most blocks held at once."""
    engine = llm.llm_engine
    kv = engine.kv_cache_manager
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    outputs, peak, t0 = {}, 0, time.perf_counter()
    usable = kv.block_pool.num_usable_blocks
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        peak = max(peak, usable - kv.num_free_blocks)
    return [outputs[str(i)] for i in range(len(prompts))], peak, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_sliding_window.json")
    args = ap.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join(sys.argv)}
    # XLA's default float32 matmul on a GPU is TF32; torch's is not. Compare true float32 with true float32.
    jax.config.update("jax_default_matmul_precision", "highest")
    model, config = hf_model()
    cfg = model_config_from_hf(config.to_dict() | {"architectures": ["MistralForCausalLM"]}, dtype="float32")
    params = weights_from_state(cfg, {k: v.float().cpu().numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 4096, n).tolist() for n in PROMPT_LENS]
    want = [hf_greedy(model, p) for p in prompts]
    ok = {}

    # Without freeing, each sequence holds ceil((len + NEW_TOKENS) / BLOCK) blocks: 10 + 22 + 97 = 129.
    per_seq = -(-(WINDOW - 1 + CHUNK) // BLOCK) + 1
    num_blocks = len(prompts) * per_seq + 1
    llm = LLM.from_params(params, cfg, None, max_model_len=2048, block_size=BLOCK, max_num_seqs=4,
                          max_num_batched_tokens=CHUNK, num_gpu_blocks_override=num_blocks)
    mine, peak, seconds = run_engine(llm, prompts)
    engine = llm.llm_engine
    report["window"] = {
        "num_gpu_blocks": num_blocks, "blocks_without_freeing": sum(-(-(n + NEW_TOKENS) // BLOCK) for n in PROMPT_LENS),
        "peak_blocks_held": peak, "preemptions": engine.scheduler.num_preemptions, "seconds": round(seconds, 2),
        "equal": [a == b for a, b in zip(mine, want)],
        "first_diff": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(mine, want)]}
    # The pool is smaller than the blocks the sequences would hold without freeing: no preemption means
    # blocks went back as they left the window.
    ok["window"] = (all(report["window"]["equal"]) and engine.scheduler.num_preemptions == 0
                    and num_blocks - 1 < report["window"]["blocks_without_freeing"])

    short = LLM.from_params(params, cfg, None, max_model_len=WINDOW, block_size=BLOCK, max_num_seqs=4,
                            max_num_batched_tokens=CHUNK, num_gpu_blocks_override=64)
    [mine_short], _, _ = run_engine(short, prompts[:1])
    dropped = short.llm_engine.model_config.sliding_window is None
    report["window_dropped"] = {"dropped": dropped, "equal": mine_short == want[0]}
    ok["window_dropped"] = dropped and mine_short == want[0]

    report["ok"] = ok
    print(json.dumps(report, indent=2))
    with open(args.log, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if all(ok.values()) else 1)


if __name__ == "__main__":
    main()
