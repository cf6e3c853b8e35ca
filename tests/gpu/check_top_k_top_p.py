"""Device check: the top-k/top-p threshold kernel (pallas_kernels/top_k_top_p.py) compiled by Triton, against
the sampler's jnp search, and the engine's sampled tokens with it against the sort's.

Run on a CUDA machine from the repo root: `python tests/gpu/check_top_k_top_p.py [--log PATH]`.
Kernel cases: 1, 7 and 256 rows of Qwen3's vocabulary (151,936) and of 1,000 (one partial tile), rows flat,
peaked, with ties and with banned (-inf) tokens, top_k alone, top_p alone, both, and neither. A row passes
when its threshold key equals the reference's, or, for a top-p cut-off, when the kernel's cut-off is a
correct nucleus up to 1e-5 of mass (float32 sums in another order than XLA's), checked in float64 on the
host. Engine case: Qwen3-0.6B's shape cut to --layers layers, random weights, 16 seeded requests at
temperature 0.8 and top_p 0.95 (and top_k 50 on half), once with the kernel (the default on a GPU) and once
with JAXLLM_TOP_P_KERNEL=0; the tokens must agree (printed; asserted for 90% of the first tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from jaxllm.sampler import ordered_key, use_top_p_kernel  # noqa: E402
from pallas_kernels.top_k_top_p import top_k_top_p_threshold, top_k_top_p_threshold_reference  # noqa: E402

MASS_TOL = 1e-5


def rows(rng, R: int, V: int) -> np.ndarray:
    """[R, V] float32: flat, peaked, ties, banned tokens, in turn."""
    kinds = (lambda: rng.standard_normal(V) * 0.5, lambda: rng.standard_normal(V) * 4.0,
             lambda: rng.integers(-3, 4, V).astype(np.float64),
             lambda: np.where((rng.random(V) < 0.7) & (np.arange(V) > 0), -np.inf, rng.standard_normal(V)))
    return np.stack([kinds[r % len(kinds)]() for r in range(R)]).astype(np.float32)


def nucleus_ok(x: np.ndarray, key: np.ndarray, threshold: int, kth: int, top_p: float) -> bool:
    """Whether cutting the row at `threshold` is top-p's nucleus over the keys >= kth, up to MASS_TOL of mass:
    the kept mass reaches top_p, the mass above the cut does not."""
    w = np.where(key >= kth, np.exp(x.astype(np.float64) - x.max()), 0.0)
    total = w.sum()
    return bool(w[key >= threshold].sum() >= (top_p - MASS_TOL) * total
                and w[key > threshold].sum() < (top_p + MASS_TOL) * total)


def check_kernel(rng, R: int, V: int, log) -> bool:
    x = rows(rng, R, V)
    settings = [(0, 0.95), (50, 1.0), (50, 0.9), (0, 1.0), (1, 0.5), (V + 1, 0.3), (1000, 0.99)]
    top_k = np.array([settings[r % len(settings)][0] for r in range(R)], np.int32)
    top_p = np.array([settings[(r // 4) % len(settings)][1] for r in range(R)], np.float32)
    args = (jnp.asarray(x), jnp.asarray(top_k), jnp.asarray(top_p))
    got = np.asarray(top_k_top_p_threshold(*args))
    want = np.asarray(jax.jit(top_k_top_p_threshold_reference)(*args))
    kth = np.asarray(jax.jit(top_k_top_p_threshold_reference)(args[0], args[1], jnp.ones(R)))  # top-k alone
    keys = np.asarray(jax.jit(ordered_key)(args[0]))
    exact = got == want
    bad = [r for r in np.nonzero(~exact)[0]
           if top_p[r] >= 1.0 or not nucleus_ok(x[r], keys[r], int(got[r]), int(kth[r]), float(top_p[r]))]
    rec = dict(name=f"threshold [{R}, {V}]", ok=not bad, exact_rows=int(exact.sum()), rows=R,
               wrong_rows=[int(r) for r in bad[:8]])
    return report.case(log, rec)


def sampled_tokens(layers: int, kernel: bool) -> list[list[int]]:
    from jaxllm import LLM, SamplingParams
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    os.environ["JAXLLM_TOP_P_KERNEL"] = "1" if kernel else "0"  # 16 rows: below the kernel's default minimum
    jax.clear_caches()  # the switch is read when a step is traced
    assert use_top_p_kernel() == kernel
    config = model_shape_config("qwen3-0.6b", num_layers=layers)
    params = init_random_weights(config, jax.random.PRNGKey(0))
    llm = LLM.from_params(params, config, None, max_num_seqs=16, max_model_len=512, gpu_memory_utilization=0.5,
                          enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": [int(t) for t in rng.integers(100, 30000, 20 + 7 * i)]} for i in range(16)]
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=50 if i % 2 else 0, seed=i, max_tokens=32,
                             ignore_eos=True) for i in range(16)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_top_k_top_p.json")
    ap.add_argument("--layers", type=int, default=2, help="the engine check's layers (it compares, not times)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    log, ok = [], True
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    for R in (1, 7, 256):
        for V in (151936, 1000):
            ok &= check_kernel(rng, R, V, log)
    with_kernel, without = sampled_tokens(a.layers, True), sampled_tokens(a.layers, False)
    same_first = float(np.mean([k[0] == s[0] for k, s in zip(with_kernel, without)]))
    same_all = float(np.mean([k == s for k, s in zip(with_kernel, without)]))
    rec = dict(name="engine top-p tokens, kernel vs sort", ok=same_first >= 0.9, same_first_token=same_first,
               same_sequence=same_all)
    ok &= report.case(log, rec)
    report.finish(a.log, ok, log)


if __name__ == "__main__":
    main()
