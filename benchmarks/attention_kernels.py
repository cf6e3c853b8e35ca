"""Attention kernel benchmark on a CUDA GPU: ours vs JAX's bundled paged_attention vs the XLA reference.

    python benchmarks/attention_kernels.py                 # full table, JSON to benchmarks/results/kernels-<device>.json
    python benchmarks/attention_kernels.py --tune          # sweep kernel parameters on a few target cases first
    python benchmarks/attention_kernels.py --table F.json  # the targets table (F.md) of an earlier run, no GPU
    python benchmarks/attention_kernels.py --window        # long contexts with a 4096 sliding window against none

Prints the two ceilings first (copy bandwidth: PyTorch device copy and a jitted JAX op, bytes read +
written; dense bf16 8192^3 matmul: PyTorch and JAX), then per case the median time, KV bytes/s and %
of the best copy bandwidth (decode), or causal TFLOP/s and % of the best matmul rate (prefill).

Timing: one jitted executable issues `reps` launches on distinct query arrays (no CSE, no host gaps);
several executions go out back to back and are waited for once; the per-launch time is the median over
rounds of (wall time / launches). `--fill-check` also traces one execution, for the device time of each
kernel. KV that fits in L2 (50-60 MB) is marked `l2`: its bandwidth is not a DRAM figure.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

TORCH_CEILINGS = r"""
import json, torch
d = torch.device("cuda")
x = torch.randn(2**30, device=d, dtype=torch.bfloat16)  # 2 GiB
y = torch.empty_like(x)
def t(f, n=20):
    for _ in range(3): f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        s.record(); f(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e) / 1e3)
    times.sort(); return times[len(times) // 2], times[0]
med, best = t(lambda: y.copy_(x))
copy = dict(median=2 * x.numel() * 2 / med / 1e12, best=2 * x.numel() * 2 / best / 1e12)
del x, y
a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16); b = torch.randn_like(a)
med, best = t(lambda: a @ b)
mm = dict(median=2 * 8192**3 / med / 1e12, best=2 * 8192**3 / best / 1e12)
print(json.dumps(dict(copy_TBps=copy, matmul_TFLOPs=mm, name=torch.cuda.get_device_name())))
"""


def torch_ceilings():
    try:
        r = subprocess.run([sys.executable, "-c", TORCH_CEILINGS], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - a missing torch must not stop the benchmark
        return dict(error=repr(e))


import jax  # noqa: E402  (after the torch subprocess, so JAX's preallocation does not starve it)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.decode import paged_decode_attention  # noqa: E402
from pallas_kernels.prefill import ragged_paged_attention as prefill_kernel  # noqa: E402
from pallas_kernels.ragged import ragged_paged_attention as ragged_kernel  # noqa: E402
from pallas_kernels.reference import ragged_paged_attention as reference  # noqa: E402
from profile_step import ProfilerRange  # noqa: E402

MODELS = {"qwen3-0.6b": (16, 8, 128), "llama-3-8b": (32, 8, 128)}
BLOCK_SIZE = 16
L2_BYTES = 50e6


def time_calls(fn, qs, *rest, execs=5, rounds=3):
    """Median seconds per launch of fn(q, *rest): one executable does len(qs) launches; `execs` of its
    executions are issued back to back and waited for once, over `rounds` rounds.

    Waiting after every execution would add the host's launch and wake-up latency (about 0.7 ms on the
    lent H200) to every len(qs) launches: with 8 decode launches that was 60-130 us a launch, more than
    half of a 126 us kernel (see `trace_calls`)."""
    many = jax.jit(lambda qs, *rest: tuple(fn(q, *rest) for q in qs))
    jax.block_until_ready(many(qs, *rest))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [many(qs, *rest) for _ in range(execs)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / (execs * len(qs)))
        del outs
    return float(np.median(times))


def trace_calls(fn, qs, *rest, label="trace"):
    """The same executable as `time_calls`, run once under jax.profiler: each kernel's device time
    (CUPTI), to set beside the wall-clock figure."""
    many = jax.jit(lambda qs, *rest: tuple(fn(q, *rest) for q in qs))
    jax.block_until_ready(many(qs, *rest))
    with ProfilerRange(os.environ.get("OUT", "/tmp") + "/kernel-trace", label, top=6):
        jax.block_until_ready(many(qs, *rest))


def jax_ceilings():
    # Distinct inputs: x * s over one x would become one multi-output fusion that reads x once.
    xs = [jax.random.normal(jax.random.key(i), (2**29,), jnp.bfloat16) for i in range(4)]  # 4 x 1 GiB
    t = time_calls(lambda x: x * 3, xs, execs=2)  # 4 GiB of outputs an execution
    copy = 2 * xs[0].size * 2 / t / 1e12
    del xs
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    bs = [jax.random.normal(jax.random.key(2 + i), (8192, 8192), jnp.bfloat16) for i in range(4)]
    t = time_calls(lambda b, a: a @ b, bs, a)
    return dict(copy_TBps=copy, matmul_TFLOPs=2 * 8192**3 / t / 1e12)


def decode_inputs(key, batch, ctx, hq, hkv, d, reps, zeros=False):
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (1, num_blocks, BLOCK_SIZE, hkv, d)
    k = jnp.zeros(shape, jnp.bfloat16) if zeros else jax.random.normal(k1, shape, jnp.bfloat16)
    v = jnp.zeros(shape, jnp.bfloat16) if zeros else jax.random.normal(k2, shape, jnp.bfloat16)
    tables = jax.random.permutation(k3, num_blocks - 1)[: batch * blocks_per_seq].reshape(batch, blocks_per_seq)
    seq_lens = jnp.full((batch,), ctx, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    qs = [jax.random.normal(jax.random.fold_in(k4, i), (batch, hq, d), jnp.bfloat16) for i in range(reps)]
    return qs, k, v, tables.astype(jnp.int32), seq_lens, qsl


def bundled_fn(hq, hkv, d, **kw):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    def f(q, k_pages, v_pages, tables, seq_lens):
        return paged_attention(q * (d**-0.5), k_pages, v_pages, tables, seq_lens, **kw)
    return f


def bench_decode(model, batch, ctx, reps, with_ref, variants=None, log=print, zeros=False):
    hq, hkv, d = MODELS[model]
    kv_bytes = 2 * batch * ctx * hkv * d * 2
    qs, k, v, tables, seq_lens, qsl = decode_inputs(jax.random.key(batch * ctx), batch, ctx, hq, hkv, d, reps, zeros)
    rec = dict(kind="decode", model=model, batch=batch, ctx=ctx, kv_bytes=kv_bytes, l2=kv_bytes < L2_BYTES)
    if zeros:
        rec["cache"] = "zeros"
    scale = d**-0.5
    for name, kw in (variants or {"ours": {}, "ours_again": {}, "stages2": dict(num_stages=2),
                                      "stages3": dict(num_stages=3), "bk64": dict(block_k=64),
                                      "bk128": dict(block_k=128)}).items():
        try:
            t = time_calls(lambda q, k, v, bt, sl, qsl, kw=kw: paged_decode_attention(
                q, k, v, 0, bt, sl, qsl, scale=scale, **kw), qs, k, v, tables, seq_lens, qsl)
            rec[name] = dict(us=t * 1e6, TBps=kv_bytes / t / 1e12, params=kw)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            rec[name] = dict(error=repr(e)[:300], params=kw)
    if variants is None:
        k_pages, v_pages = k[0].transpose(2, 0, 1, 3), v[0].transpose(2, 0, 1, 3)  # [hkv, pages, page, d]
        for name, kw in (("bundled", {}), ("bundled_k4", dict(k_splits=4))):
            if tables.shape[1] % kw.get("k_splits", 16):
                continue
            try:
                t = time_calls(bundled_fn(hq, hkv, d, **kw), qs, k_pages, v_pages, tables, seq_lens)
                rec[name] = dict(us=t * 1e6, TBps=kv_bytes / t / 1e12, params=kw)
            except Exception as e:  # noqa: BLE001
                rec[name] = dict(error=repr(e)[:200])
        del k_pages, v_pages
        if with_ref:
            t = time_calls(lambda q, k, v, bt, sl, qsl: reference(q, k, v, 0, bt, sl, qsl, scale=scale),
                           qs[:4], k, v, tables, seq_lens, qsl, execs=3)
            rec["reference"] = dict(us=t * 1e6, TBps=kv_bytes / t / 1e12)
    log(rec)
    return rec


def causal_flops(chunk, ctx_before, hq, d):
    pairs = chunk * ctx_before + chunk * (chunk + 1) // 2
    return 4 * d * hq * pairs


# "ours": the Triton ragged kernel (ragged.py); "mosaic": the Mosaic GPU prefill kernel (prefill.py);
# Other versions of prefill.py given with --baseline-prefill (A/B across commits in one run) are timed
# under their file's stem (prefill_5b92ccf.py.txt: "prefill_5b92ccf").
PREFILL_KERNELS = {"triton": ragged_kernel, "mosaic": prefill_kernel}
PREFILL_LABELS = {"ours": "triton", "cudnn": "cudnn dense"}
PREFILL_VARIANTS = {
    "ours": {}, "ours_again": {},
    "mosaic": dict(kernel="mosaic"), "mosaic_again": dict(kernel="mosaic"),
    "mosaic_bkv64_s3": dict(kernel="mosaic", block_kv=64, num_stages=3),
    "mosaic_bkv64_s4": dict(kernel="mosaic", block_kv=64, num_stages=4),
}


def prefill_inputs(model, chunk, ctx_before, tokens, reps):
    """`tokens // chunk` sequences, each a chunk over `ctx_before` tokens of context, in a paged cache of
    random bf16 values with shuffled block tables: (`reps` query arrays, k, v, block tables, seq_lens,
    query_start_loc)."""
    hq, hkv, d = MODELS[model]
    seqs = max(1, tokens // chunk)
    total = ctx_before + chunk
    blocks_per_seq = -(-total // BLOCK_SIZE)
    num_blocks = seqs * blocks_per_seq + 1
    k1, k2, k3, k4 = jax.random.split(jax.random.key(chunk + ctx_before), 4)
    shape = (1, num_blocks, BLOCK_SIZE, hkv, d)
    k = jax.random.normal(k1, shape, jnp.bfloat16)
    v = jax.random.normal(k2, shape, jnp.bfloat16)
    tables = jax.random.permutation(k3, num_blocks - 1)[: seqs * blocks_per_seq].reshape(seqs, blocks_per_seq)
    seq_lens = jnp.full((seqs,), total, jnp.int32)
    qsl = (jnp.arange(seqs + 1) * chunk).astype(jnp.int32)
    qs = [jax.random.normal(jax.random.fold_in(k4, i), (seqs * chunk, hq, d), jnp.bfloat16) for i in range(reps)]
    return qs, k, v, tables.astype(jnp.int32), seq_lens, qsl


def bench_prefill(model, chunk, ctx_before, tokens, reps, variants=None, log=print):
    hq, hkv, d = MODELS[model]
    qs, k, v, tables, seq_lens, qsl = prefill_inputs(model, chunk, ctx_before, tokens, reps)
    seqs, T = seq_lens.shape[0], qs[0].shape[0]
    flops = seqs * causal_flops(chunk, ctx_before, hq, d)
    rec = dict(kind="prefill", model=model, chunk=chunk, ctx_before=ctx_before, seqs=seqs, tokens=T, flops=flops)
    scale = d**-0.5
    for name, kw in (variants or PREFILL_VARIANTS).items():
        kernel = PREFILL_KERNELS[kw.get("kernel", "triton")]
        params = {key: val for key, val in kw.items() if key != "kernel"}
        try:
            t = time_calls(lambda q, k, v, bt, sl, qsl, params=params, kernel=kernel: kernel(
                q, k, v, 0, bt, sl, qsl, scale=scale, **params), qs, k, v, tables, seq_lens, qsl)
            rec[name] = dict(us=t * 1e6, TFLOPs=flops / t / 1e12, params=kw)
        except Exception as e:  # noqa: BLE001
            rec[name] = dict(error=repr(e)[:300], params=kw)
    if ctx_before == 0 and jax.default_backend() == "gpu":
        # The peer on fresh chunks: cuDNN's fused flash attention (jax.nn.dot_product_attention on Hopper),
        # dense [seqs, chunk] batches with the same heads, causal. Not paged, so it reads K/V contiguously.
        kd, vd = (jax.random.normal(kk, (seqs, chunk, hkv, d), jnp.bfloat16)
                  for kk in jax.random.split(jax.random.key(chunk + ctx_before + 1)))
        try:
            t = time_calls(lambda q, kd, vd: jax.nn.dot_product_attention(
                q.reshape(seqs, chunk, hq, d), kd, vd, scale=scale, is_causal=True, implementation="cudnn"),
                qs, kd, vd)
            rec["cudnn"] = dict(us=t * 1e6, TFLOPs=flops / t / 1e12, params={"peer": "cudnn dense causal"})
        except Exception as e:  # noqa: BLE001
            rec["cudnn"] = dict(error=repr(e)[:300])
        del kd, vd
    log(rec)
    return rec


def bench_window(log, window=4096, model="llama-3-8b"):
    """Long contexts with a sliding window against none (Mistral-7B has Llama-3-8B's heads). The kernels
    read only the window's tiles, so decode over 32k with a 4k window should take about what a plain 4k
    context takes (timed too, as the floor), and a prefill chunk deep in a long context about what it
    takes over 4k. `window_kv_bytes` / `TBps` count the K/V inside the window, what the kernel must read."""
    hkv, d = MODELS[model][1:]
    variants = {"no_window": {}, f"window{window}": dict(sliding_window=window)}
    for batch in (1, 8, 64):
        bench_decode(model, batch, window, reps=16, with_ref=False, log=log, variants={"no_window": {}})
        for ctx in (8192, 32768):
            rec = bench_decode(model, batch, ctx, reps=16, with_ref=False, log=lambda rec: None, variants=variants)
            rec.update(window=window, window_kv_bytes=2 * batch * min(ctx, window) * hkv * d * 2)
            windowed = rec[f"window{window}"]
            if "us" in windowed and "us" in rec["no_window"]:
                windowed["TBps"] = rec["window_kv_bytes"] / (windowed["us"] * 1e-6) / 1e12
                rec["speedup"] = rec["no_window"]["us"] / windowed["us"]
            log(rec)
    for chunk, ctx_before in ((2048, window - 2048), (2048, 30720)):
        rec = bench_prefill(model, chunk, ctx_before, tokens=8192, reps=4, log=lambda rec: None,
                            variants={"ours": {}, f"ours_window{window}": dict(sliding_window=window)})
        rec["window"] = window
        if "us" in rec["ours"] and "us" in rec[f"ours_window{window}"]:
            rec["speedup"] = rec["ours"]["us"] / rec[f"ours_window{window}"]["us"]
        log(rec)


def tune_decode(log):
    """Decode sweep (tile, warps, pipeline depth; no split) on the cases the targets hinge on: Llama-3-8B
    shape at B=64 with 2k context (issue 5), B=256 with 1k (issue 6's step), B=256 with 2k, and Qwen3-0.6B
    at B=256 with 512."""
    variants = {f"bk{bk}_w{nw}_s{ns}": dict(block_k=bk, num_warps=nw, num_stages=ns, num_splits=1)
                for bk in (32, 64) for nw in (2, 4) for ns in (2, 3, 4)}
    for model, batch, ctx in (("llama-3-8b", 64, 2048), ("llama-3-8b", 256, 1024), ("llama-3-8b", 256, 2048),
                              ("qwen3-0.6b", 256, 512)):
        bench_decode(model, batch, ctx, reps=16, with_ref=False, variants=variants, log=log)


def tune_decode_targets(log):
    """Decode sweep on the target cases at their smallest (batch 32 and 64 over 1k and 8k, Qwen3-0.6B heads):
    split-K, tile, warps and pipeline depth, with the defaults' choice timed beside them."""
    variants = {"default": {}} | {
        f"sp{splits}_bk{bk}_w{nw}_s{ns}": dict(num_splits=splits, block_k=bk, num_warps=nw, num_stages=ns)
        for splits, bk, nw, ns in itertools.product((1, 2, 4), (64, 128), (4, 8), (2, 3, 4))}
    for batch, ctx in ((32, 1024), (64, 1024), (32, 8192)):
        bench_decode("qwen3-0.6b", batch, ctx, reps=16, with_ref=False, variants=variants, log=log)


def tune(log):
    dec = {}
    for cfg in ((128, 8, 3), (64, 4, 3), (64, 4, 2), (128, 4, 2), (64, 8, 3)):
        for splits in (None, 1, 2):
            dec[f"bk{cfg[0]}_w{cfg[1]}_s{cfg[2]}_sp{splits}"] = dict(
                block_k=cfg[0], num_warps=cfg[1], num_stages=cfg[2], num_splits=splits)
    for model, batch, ctx in (("llama-3-8b", 64, 2048), ("qwen3-0.6b", 256, 1024), ("llama-3-8b", 32, 2048),
                              ("llama-3-8b", 8, 32768)):
        bench_decode(model, batch, ctx, reps=8, with_ref=False, variants=dec, log=log)
    pre = {}
    for bm, bk, nw, ns in ((128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 2)):
        for lf in (False, True):
            for ps in (False, True):
                pre[f"bm{bm}_bk{bk}_w{nw}_s{ns}_lf{int(lf)}_ps{int(ps)}"] = dict(
                    block_m=bm, block_k=bk, num_warps=nw, num_stages=ns, longest_first=lf, prescale_q=ps)
    for model in ("llama-3-8b", "qwen3-0.6b"):
        bench_prefill(model, 2048, 4096, tokens=8192, reps=4, variants=pre, log=log)
    bench_prefill("llama-3-8b", 512, 0, tokens=8192, reps=4, variants=pre, log=log)


def load_prefill_version(file, name):
    """Another version of pallas_kernels/prefill.py as a module, for A/B runs in one process. Any file
    name, e.g. `git show 5b92ccf:pallas_kernels/prefill.py > /tmp/prefill_5b92ccf.py.txt` (a .txt name keeps it
    out of pytest's and ruff's way)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader(name, file)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, file, loader=loader))
    loader.exec_module(module)
    return module


def parse_prefill_cases(text):
    """"512:0,2048:4096" -> [(512, 0), (2048, 4096)]: (chunk, context before it); ValueError if malformed."""
    cases = [tuple(int(v) for v in case.split(":")) for case in text.split(",")]
    if any(len(case) != 2 or case[0] < 1 or case[1] < 0 for case in cases):
        raise ValueError(text)
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-decode", action="store_true", help="only the wider decode sweep")
    ap.add_argument("--tune-decode-targets", action="store_true",
                    help="decode sweep (split-K too) on the smallest target cases")
    ap.add_argument("--fill-check", action="store_true", help="decode over a cache of zeros against random values")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="target cases only")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--prefill", action="store_true", help="only the prefill cases")
    only.add_argument("--decode", action="store_true", help="only the decode cases")
    ap.add_argument("--baseline-prefill", action="append", default=[], metavar="FILE",
                    help="another version of pallas_kernels/prefill.py, timed beside ours under its file's "
                         "stem (repeatable)")
    ap.add_argument("--prefill-variants", default=None, metavar="NAMES",
                    help=f"comma-separated prefill variants to time, of {', '.join(PREFILL_VARIANTS)} "
                         "(default all); the --baseline-prefill files are always timed")
    ap.add_argument("--prefill-cases", default=None, metavar="CHUNK:CTX,...",
                    help="only these prefill cases, e.g. 512:0,2048:0 (default: chunks 512 and 2048 over "
                         "contexts 0 and 4096)")
    ap.add_argument("--window", action="store_true",
                    help="only long contexts with a 4096 sliding window against none (decode and prefill)")
    ap.add_argument("--table", metavar="JSON", default=None,
                    help="only write the targets table (.md) of an earlier run's JSON beside it; no GPU needed")
    a = ap.parse_args()
    if a.table is not None:
        if not Path(a.table).is_file():
            ap.error(f"--table: no such file: {a.table}")
        Path(a.table).with_suffix(".md").write_text(targets_table(json.loads(Path(a.table).read_text())))
        return
    if a.prefill_variants is not None:
        names = a.prefill_variants.split(",")
        if unknown := [n for n in names if n not in PREFILL_VARIANTS]:
            ap.error(f"--prefill-variants: unknown {unknown}; choose from {list(PREFILL_VARIANTS)}")
        for n in set(PREFILL_VARIANTS) - set(names):
            del PREFILL_VARIANTS[n]
    baselines = []
    for file in a.baseline_prefill:
        if not Path(file).is_file():
            ap.error(f"--baseline-prefill: no such file: {file}")
        name = Path(file).name.split(".")[0]
        if name in PREFILL_KERNELS:
            ap.error(f"--baseline-prefill: two versions named {name!r}")
        PREFILL_KERNELS[name] = load_prefill_version(file, name).ragged_paged_attention
        PREFILL_VARIANTS.update({name: dict(kernel=name), f"{name}_again": dict(kernel=name)})
        baselines.append(name)
    prefill_cases = [(c, x) for c in (512, 2048) for x in (0, 4096)]
    if a.prefill_cases is not None:
        try:
            prefill_cases = parse_prefill_cases(a.prefill_cases)
        except ValueError:
            ap.error(f"--prefill-cases: want CHUNK:CTX pairs such as 512:0,2048:4096, got {a.prefill_cases!r}")
    device = jax.devices()[0].device_kind
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    results = dict(device=device, date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
                   git_commit=os.environ.get("JAXLLM_GIT_COMMIT") or commit or "unknown",
                   command=" ".join(["python"] + sys.argv), baselines=baselines, cases=[])
    stem = "kernels-window" if a.window else "kernels"
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"{stem}-{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(rec):
        results["cases"].append(rec)
        print(json.dumps(rec), flush=True)
        out.write_text(json.dumps(results, indent=1))

    results["ceilings_torch"] = torch_ceilings()
    results["ceilings_jax"] = jax_ceilings()
    tc, jc = results["ceilings_torch"], results["ceilings_jax"]
    copy = max(jc["copy_TBps"], tc.get("copy_TBps", {}).get("best", 0))
    mm = max(jc["matmul_TFLOPs"], tc.get("matmul_TFLOPs", {}).get("median", 0))
    results["ceiling_copy_TBps"], results["ceiling_matmul_TFLOPs"] = copy, mm
    print(f"ceilings: copy {copy:.2f} TB/s (jax {jc['copy_TBps']:.2f}, torch {tc.get('copy_TBps')}); "
          f"bf16 matmul {mm:.0f} TFLOP/s (jax {jc['matmul_TFLOPs']:.0f}, torch {tc.get('matmul_TFLOPs')})",
          flush=True)
    if a.fill_check:
        for model, batch, ctx in (("llama-3-8b", 64, 2048), ("llama-3-8b", 256, 1024)):
            for zeros in (False, True):
                bench_decode(model, batch, ctx, reps=8, with_ref=False, log=log, zeros=zeros,
                             variants={"ours": {}, "ours_again": {}})
            hq, hkv, d = MODELS[model]
            qs, k, v, tables, seq_lens, qsl = decode_inputs(jax.random.key(batch * ctx), batch, ctx, hq, hkv, d, 8)
            print(f"== kernel trace {model} B={batch} ctx={ctx}", flush=True)
            trace_calls(lambda q, k, v, bt, sl, qsl: paged_decode_attention(q, k, v, 0, bt, sl, qsl, scale=d**-0.5),
                        qs, k, v, tables, seq_lens, qsl, label=f"decode-{batch}-{ctx}")
            del qs, k, v
        return
    if a.tune_decode_targets:
        tune_decode_targets(log)
        return
    if a.window:
        bench_window(log)
        print_window_table(results)
        return
    if a.tune or a.tune_decode:
        tune_decode(log) if a.tune_decode else tune(log)
        return
    free = 60e9 if "H100" in device else 120e9
    for model in MODELS if not a.prefill else ():
        for batch in (1, 8, 64, 256) if not a.quick else (32, 64):
            for ctx in (512, 2048, 8192, 32768) if not a.quick else (1024, 8192):
                kv = 2 * batch * ctx * MODELS[model][1] * MODELS[model][2] * 2
                if 2 * kv > free / 2:  # ours + the bundled kernel's copy of the cache
                    results["cases"].append(dict(kind="decode", model=model, batch=batch, ctx=ctx, skipped="memory"))
                    continue
                bench_decode(model, batch, ctx, reps=16, with_ref=batch * ctx <= 64 * 2048, log=log)
    for model in MODELS if not a.decode else ():
        for chunk, ctx_before in prefill_cases:
            bench_prefill(model, chunk, ctx_before, tokens=8192, reps=4, log=log)
    print_table(results)
    out.with_suffix(".md").write_text(targets_table(results))


def print_window_table(results):
    """One line a case of `--window`: time without and with the window, and the speed-up."""
    print(f"\n{results['device']} jax {results['jax']}  sliding window vs none (us)")
    for rec in results["cases"]:
        times = "  ".join(f"{k} {v['us']:.1f}" for k, v in rec.items() if isinstance(v, dict) and "us" in v)
        shape = (f"decode B={rec['batch']} ctx={rec['ctx']}" if rec["kind"] == "decode"
                 else f"prefill chunk={rec['chunk']} over {rec['ctx_before']} x{rec['seqs']}")
        speedup = f"  speed-up {rec['speedup']:.2f}x" if "speedup" in rec else ""
        print(f"{shape:40s} {times}{speedup}")


def print_table(results):
    copy, mm = results["ceiling_copy_TBps"], results["ceiling_matmul_TFLOPs"]
    print(f"\n{results['device']} jax {results['jax']}  copy ceiling {copy:.2f} TB/s, matmul {mm:.0f} TFLOP/s")
    nan = float("nan")
    us = lambda r, k: r.get(k, {}).get("us", nan)  # noqa: E731
    for r in results["cases"]:
        if r.get("skipped"):
            continue
        if r["kind"] == "decode":
            o = us(r, "ours")
            bb = min(us(r, "bundled"), us(r, "bundled_k4"))
            print(f"decode {r['model']:11s} B={r['batch']:4d} ctx={r['ctx']:6d}: ours {o:8.1f} us "
                  f"(again {us(r, 'ours_again'):8.1f}; 2 / 3 stages {us(r, 'stages2'):8.1f} / {us(r, 'stages3'):8.1f}) "
                  f"{r['kv_bytes'] / o / 1e6:5.2f} TB/s "
                  f"({100 * r['kv_bytes'] / o / 1e6 / copy:3.0f}%)  bundled {us(r, 'bundled'):8.1f} "
                  f"(k4 {us(r, 'bundled_k4'):8.1f}) x{bb / o:4.1f}  ref {us(r, 'reference'):9.1f}"
                  f"{'  l2' if r['l2'] else ''}")
        else:  # every timing the case holds (variants, baselines, cuDNN): time, repeat, share of the matmul rate
            pct = lambda t: 100 * r["flops"] / t / 1e6 / mm  # noqa: E731
            timed = {k: v["us"] for k, v in r.items() if isinstance(v, dict) and "us" in v}
            parts = [f"{PREFILL_LABELS.get(k, k)} {t:8.1f}"
                     + (f" (again {timed[k + '_again']:8.1f})" if k + "_again" in timed else "")
                     + f" {pct(min(t, timed.get(k + '_again', t))):3.0f}%"
                     for k, t in timed.items() if not k.endswith("_again")]
            parts += [f"{k} failed" for k, v in r.items() if isinstance(v, dict) and "error" in v]
            print(f"prefill {r['model']:11s} chunk={r['chunk']:5d} ctx={r['ctx_before']:5d} x{r['seqs']:2d} (us): "
                  + " | ".join(parts))


# The targets (issue 5): decode at batch >= 32 and context >= 1k reads the cache at >= 75% of the
# copy rate and at >= 2x the bundled kernel's rate; prefill chunks >= 512 run at >= 50% of the matmul rate.
DECODE_COPY_SHARE, DECODE_VS_BUNDLED, PREFILL_MATMUL_SHARE = 0.75, 2.0, 0.50


def best_us(rec, *names):
    """The fastest timing among `names` and their `_again` repeats in a case record (nan if none ran)."""
    times = [rec[k]["us"] for n in names for k in (n, n + "_again") if "us" in rec.get(k, {})]
    return min(times, default=float("nan"))


def points_short(share, target):
    return f"{share:.0%}, {100 * (target - share):.0f} points short"


def targets_table(results):
    """Markdown: the run's ceilings, then each case with its figures and, where a target applies, whether
    it is met or by how much it is missed. Written beside the JSON (`.md`)."""
    copy, mm = results["ceiling_copy_TBps"], results["ceiling_matmul_TFLOPs"]
    lines = [f"# Attention kernels: {results['device']}",
             "",
             f"{results['date']}, jax {results['jax']}, commit {results['git_commit']}; `{results['command']}`.",
             f"Ceilings measured in this run: copy {copy:.2f} TB/s, dense bf16 matmul {mm:.0f} TFLOP/s.",
             ""]
    decode = [r for r in results["cases"] if r.get("kind") == "decode" and not r.get("skipped")]
    if decode:
        lines += ["## Decode: ours against JAX's bundled `paged_attention` (best of default and k_splits=4)",
                  "",
                  f"Targets at batch >= 32 and context >= 1k: >= {DECODE_COPY_SHARE:.0%} of the copy rate, "
                  f">= {DECODE_VS_BUNDLED:g}x the bundled kernel.",
                  "",
                  "| model | batch | context | ours (us) | TB/s | of copy | bundled (us) | ours vs bundled "
                  "| jnp reference under XLA (us) | targets |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in decode:
            ours, bundled = best_us(r, "ours"), best_us(r, "bundled", "bundled_k4")
            tbps = r["kv_bytes"] / ours / 1e6
            share, ratio = tbps / copy, bundled / ours
            verdict = "-"
            if r["batch"] >= 32 and r["ctx"] >= 1024:
                twice = DECODE_VS_BUNDLED * r["kv_bytes"] / bundled / 1e6 / copy  # as a share of copy
                verdict = "copy: " + ("met" if share >= DECODE_COPY_SHARE
                                      else f"missed, {points_short(share, DECODE_COPY_SHARE)}")
                verdict += "; 2x: " + ("met" if ratio >= DECODE_VS_BUNDLED
                                       else f"missed, {ratio:.2f}x (2x would be {twice:.0%} of copy)")
            ref = best_us(r, "reference")
            lines.append(f"| {r['model']} | {r['batch']} | {r['ctx']} | {ours:.1f} | {tbps:.2f} | {share:.0%} "
                         f"| {bundled:.1f} | {ratio:.2f}x | {f'{ref:.1f}' if ref == ref else '-'} | {verdict} |")
        lines.append("")
    prefill = [r for r in results["cases"] if r.get("kind") == "prefill"]
    if prefill:
        lines += ["## Prefill: the Mosaic GPU kernel (`prefill.py`), 8192 tokens a step",
                  "",
                  f"Target for chunks >= 512: >= {PREFILL_MATMUL_SHARE:.0%} of the matmul rate (causal FLOPs). "
                  "Peers in the same run: cuDNN's fused attention on dense inputs (fresh chunks only) and our "
                  "Triton ragged kernel.",
                  "",
                  "| model | chunk | context | ours (us) | TFLOP/s | of matmul | cuDNN (us, share) "
                  "| Triton ragged (us, share) | target |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in prefill:
            share = lambda t: r["flops"] / t / 1e6 / mm  # noqa: E731
            ours = best_us(r, "mosaic")
            peers = [f"{t:.1f}, {share(t):.0%}" if t == t else "-"
                     for t in (best_us(r, "cudnn"), best_us(r, "ours"))]
            verdict = "-"
            if r["chunk"] >= 512 and ours == ours:
                verdict = ("met" if share(ours) >= PREFILL_MATMUL_SHARE
                           else f"missed, {points_short(share(ours), PREFILL_MATMUL_SHARE)}")
            lines.append(f"| {r['model']} | {r['chunk']} | {r['ctx_before']} | {ours:.1f} | "
                         f"{r['flops'] / ours / 1e6:.0f} | {share(ours):.0%} | {peers[0]} | {peers[1]} | {verdict} |")
        lines.append("")
    if any("missed" in line for line in lines):
        lines += ["What is in the way of the missed targets (profiles, ablations, the designs tried): "
                  "`pallas_kernels/NOTES.md`, \"Where the targets stand\".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
