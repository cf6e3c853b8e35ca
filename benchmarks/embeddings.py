"""Embedding throughput: requests/s and tokens/s of jaxllm's pooling engine at real encoder shapes with random
weights, short (~16 tokens) and long (~512) inputs, against sentence-transformers and vLLM's pooling runner on
the same device in the same run.

    python benchmarks/embeddings.py                                   # every shape, short and long
    python benchmarks/embeddings.py --compare sentence-transformers vllm --repeats 5
    python benchmarks/embeddings.py --shapes bge-m3 --lengths 512 --compare vllm --dry-run

Inputs are random token ids (`vllm_pooling_peer.workload`), so tokenization is left out on every side. Each
side runs a warm-up, then --repeats timed passes over the whole workload; a row reports the median pass
(`elapsed_s`) and keeps every pass (`runs_s`). jaxllm's warm-up compiles nothing on a GPU (its steps compile
when the engine starts, once a shape: `start_s`); on a CPU it compiles the shapes the run needs.
sentence-transformers runs as its `encode` does after tokenizing (sorted by length, batches of
--st-batch-size, padded to the longest, inference mode, its Transformer -> Pooling -> Normalize modules),
after one warm-up batch. vLLM runs in its own process (vllm_pooling_peer.py), before JAX takes the GPU (XLA
reserves most of its memory), on a folder with the shape's config.json, sentence-transformers' pooling files
and a placeholder tokenizer (benchmarks/encoder_folder.py); sentence-transformers loads the same folder with
random weights saved in it. Where vLLM is not importable its column says so. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

# torch shares this process's GPU: JAX's pool stays at its default 75% (importing jaxllm would make it 95%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.encoder_folder import encoder_config, encoder_folder, max_model_len  # noqa: E402
from benchmarks.throughput import device_name, git_commit, write_result  # noqa: E402
from benchmarks.vllm_pooling_peer import workload  # noqa: E402
from jaxllm.models import bert  # noqa: E402
from jaxllm.models.shapes import ENCODER_POOLING, ENCODER_SHAPES, encoder_shape_config  # noqa: E402
from jaxllm.pooler import PoolerConfig  # noqa: E402
from jaxllm.pooling_engine import PoolingEngine  # noqa: E402
from jaxllm.pooling_params import PoolingParams  # noqa: E402
from jaxllm.pooling_runner import PoolInput  # noqa: E402

# Requests per row when --num-requests is not given: about 64k tokens on a GPU, 4-8k on the 2-core CPU.
CPU_REQUESTS = {("all-minilm-l6-v2", 16): 512, ("all-minilm-l6-v2", 512): 16, ("bge-base", 16): 256,
                ("bge-base", 512): 8, ("bge-m3", 16): 64, ("bge-m3", 512): 4}


def timed_passes(fn, repeats: int) -> dict:
    """`fn` run `repeats` times: the median pass (elapsed_s), the best, and every pass."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"elapsed_s": round(statistics.median(runs), 4), "best_s": round(min(runs), 4),
            "runs_s": [round(r, 4) for r in runs]}


def build_engine(shape: str, dtype: str, max_tokens: int | None, max_seqs: int | None) -> tuple[PoolingEngine, float]:
    """jaxllm's engine at `shape` with random weights, and the seconds it took to start (on a GPU: every step
    shape compiles here, once for all of the shape's rows)."""
    config = encoder_shape_config(shape, dtype)
    params = bert.init_random_weights(config, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    engine = PoolingEngine(params, config, None, kind="embed",
                           pooler_config=PoolerConfig(pooling_type=ENCODER_POOLING[shape], normalize=True),
                           max_model_len=min(config.max_model_len, 8192), max_num_batched_tokens=max_tokens,
                           max_num_seqs=max_seqs)
    return engine, round(time.perf_counter() - t0, 2)


def run_jaxllm(engine: PoolingEngine, prompts, repeats: int) -> dict:
    inputs = [PoolInput(p) for p in prompts]
    params_list = [PoolingParams()] * len(inputs)
    t0 = time.perf_counter()
    out = engine.pool(inputs, params_list)  # on a CPU: compiles the step shapes the run needs
    warmup = time.perf_counter() - t0
    assert len(out) == len(inputs) and np.isfinite(out[0]).all()
    return {**timed_passes(lambda: engine.pool(inputs, params_list), repeats), "warmup_s": round(warmup, 2),
            "compiled_step_shapes": len(engine.runner.compiled_shapes),
            "max_num_batched_tokens": engine.runner.max_num_batched_tokens, "max_num_seqs": engine.runner.max_num_seqs}


def vllm_command(python: str, folder: str, shape: str, lengths, num_requests, args, output_json: str) -> list[str]:
    """The vllm_pooling_peer.py command for one shape's rows (the flags jaxllm runs with, where given)."""
    cmd = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_pooling_peer.py"),
           "--model", folder, "--lengths", *map(str, lengths), "--num-requests", *map(str, num_requests),
           "--repeats", str(args.repeats), "--dtype", args.vllm_dtype,
           "--max-model-len", str(max_model_len(shape)),
           "--output-json", output_json]
    for flag, value in (("--max-num-seqs", args.max_num_seqs),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def log_tail(text: str, lines: int = 12) -> str:
    """The last lines of a peer's log, progress bars left out."""
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    return "\n".join(kept[-lines:])


def run_vllm(shapes, lengths, counts: dict, args) -> tuple[dict, str | None]:
    """{(shape, length): vLLM's row} for every row, each shape in one vllm_pooling_peer.py process, and vLLM's
    version; a row is {"skipped": why} where vLLM is not importable or its run failed."""
    if not args.dry_run and args.vllm_python == sys.executable and importlib.util.find_spec("vllm") is None:
        why = "vLLM is not importable here (pass --vllm-python for another environment's)"
        print(f"vllm: skipped: {why}", flush=True)
        return {(s, n): {"skipped": why} for s in shapes for n in lengths}, None
    out, version = {}, None
    for shape in shapes:
        folder = encoder_folder(shape, args.vllm_dtype, tempfile.mkdtemp(prefix=f"vllm-{shape}-"))
        result_json = os.path.join(folder, "result.json")
        cmd = vllm_command(args.vllm_python, folder, shape, lengths, [counts[shape, n] for n in lengths], args,
                           result_json)
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            subprocess.run([*cmd, "--dry-run"], check=True)
            continue
        proc = subprocess.run(cmd, text=True, capture_output=True, timeout=args.vllm_timeout)
        print(proc.stdout, end="", flush=True)
        # The folder is fresh: a result.json in it is this run's, written after every row was timed.
        if proc.returncode != 0 and not os.path.exists(result_json):
            why = f"vLLM failed (exit {proc.returncode}): {log_tail(proc.stderr)}"
            print(f"vllm: {why}", flush=True)
            out.update({(shape, n): {"skipped": why} for n in lengths})
            continue
        with open(result_json) as f:
            result = json.load(f)
        version = result["vllm_version"]
        for row in result["rows"]:
            out[shape, row["input_len"]] = {k: row[k] for k in ("elapsed_s", "best_s", "runs_s")}
            out[shape, row["input_len"]]["init_s"] = result["init_s"]
    return out, version


def build_sentence_transformer(shape: str, folder: str):
    """A SentenceTransformer of random weights at `shape`, loaded from `folder` as written for vLLM
    (`encoder_folder`: the same pooling files and placeholder tokenizer) with the weights saved beside them."""
    import transformers
    from sentence_transformers import SentenceTransformer

    encoder_folder(shape, "float32", folder)
    transformers.AutoModel.from_config(encoder_config(shape)).save_pretrained(folder)
    st = SentenceTransformer(folder, device="cuda" if jax.default_backend() == "gpu" else "cpu")
    return st.half() if jax.default_backend() == "gpu" else st


def run_sentence_transformers(shape: str, prompts, batch_size: int, repeats: int) -> dict:
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

    def one_pass():
        outs = [encode([prompts[i] for i in order[j:j + batch_size]]) for j in range(0, len(order), batch_size)]
        assert sum(len(o) for o in outs) == len(prompts)

    return {**timed_passes(one_pass, repeats), "batch_size": batch_size, "torch_threads": torch.get_num_threads()}


SIDES = (("jaxllm", "jaxllm"), ("sentence_transformers", "sentence-transformers"), ("vllm", "vllm"))


def default_requests(shape: str, length: int, cpu: bool) -> int:
    """About 64k tokens a row on a GPU, 4-8k on the 2-core CPU."""
    return CPU_REQUESTS[(shape, length)] if cpu else max(64, 65536 // length)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(ENCODER_SHAPES), choices=list(ENCODER_SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 512], help="tokens per input")
    ap.add_argument("--num-requests", type=int, default=None, help="per row (default: by shape and length)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per row and side; rows report the median")
    ap.add_argument("--dtype", default=None, help="jaxllm's weights and compute (default: float32 on a CPU, bfloat16 on a GPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="jaxllm's (and vLLM's, when given)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="jaxllm's (and vLLM's, when given)")
    ap.add_argument("--compare", nargs="*", default=[], choices=["none", "sentence-transformers", "vllm"])
    ap.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode default")
    ap.add_argument("--vllm-python", default=sys.executable, help="the Python that has vLLM (default: this one)")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--vllm-timeout", type=float, default=1800, help="seconds for one shape's vLLM process")
    ap.add_argument("--dry-run", action="store_true", help="print the vLLM commands and arguments; run nothing")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]  # a shared machine's figures move with its load: recorded beside them
    vllm_rows, vllm_version = {}, None
    if "vllm" in args.compare:  # first: JAX has not touched the GPU yet (vLLM runs where JAX would not)
        counts = {(s, n): args.num_requests or default_requests(s, n, cpu=False)
                  for s in args.shapes for n in args.lengths}
        vllm_rows, vllm_version = run_vllm(args.shapes, args.lengths, counts, args)
    if args.dry_run:
        return None
    cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    rows, attention = [], None
    for shape in args.shapes:
        engine, start_s = build_engine(shape, dtype, args.max_num_batched_tokens, args.max_num_seqs)
        attention = engine.runner.attention  # $JAXLLM_ENCODER_ATTENTION, or the backend's default
        for length in args.lengths:
            n = args.num_requests or default_requests(shape, length, cpu)
            prompts = workload(n, length, ENCODER_SHAPES[shape]["vocab_size"], seed=length)
            tokens = n * length
            row = {"shape": shape, "input_len": length, "num_requests": n,
                   "jaxllm": {**run_jaxllm(engine, prompts, args.repeats), "start_s": start_s}}
            if "sentence-transformers" in args.compare:
                row["sentence_transformers"] = run_sentence_transformers(shape, prompts, args.st_batch_size,
                                                                         args.repeats)
            if "vllm" in args.compare:
                row["vllm"] = vllm_rows[shape, length]
                if cpu and "elapsed_s" in row["vllm"]:  # vLLM ran the GPU's request count
                    row["vllm"] = {"skipped": f"jaxllm ran on the CPU with {n} requests; vLLM on a GPU"}
            cells = []
            for key, label in SIDES:
                side = row.get(key)
                if side is None:
                    continue
                if "elapsed_s" not in side:
                    cells.append(f"{label} skipped")
                    continue
                side["requests_per_s"] = round(n / side["elapsed_s"], 2)
                side["tokens_per_s"] = round(tokens / side["elapsed_s"], 1)
                cells.append(f"{label} {side['requests_per_s']:10,.2f} req/s {side['tokens_per_s']:12,.1f} tok/s")
                if key != "jaxllm":
                    ratio = round(side["elapsed_s"] / row["jaxllm"]["elapsed_s"], 2)
                    row["speedup" if key == "sentence_transformers" else "speedup_vs_vllm"] = ratio
                    cells[-1] += f" ({ratio}x)"
            row["load_average_1m"] = round(os.getloadavg()[0], 2)  # each row's figures beside the load they ran under
            print(f"{shape:18s} len {length:4d} x{n:5d}: " + " | ".join(cells) + f" | load {row['load_average_1m']}",
                  flush=True)
            rows.append(row)
    versions = {"jax": jax.__version__, "python": platform.python_version()}
    if "sentence-transformers" in args.compare:
        import sentence_transformers
        import torch

        versions.update(torch=torch.__version__, sentence_transformers=sentence_transformers.__version__)
    if vllm_version:
        versions["vllm"] = vllm_version
    result = {"benchmark": "embeddings", "device": device_name(), "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions, "commit": git_commit(), "command": " ".join(["python", *sys.argv]),
              "dtype": dtype, "repeats": args.repeats,
              "encoder_attention": attention,
              "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "rows": rows}
    tag = "cpu" if cpu else device_name().replace(" ", "_")
    write_result(result, args.output_json, f"embeddings-{tag}.json")
    return result


if __name__ == "__main__":
    main()
