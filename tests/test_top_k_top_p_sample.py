"""The top-k/top-p rejection kernel (the Pallas interpreter): its token is argmax(x + g) over the set the
threshold keeps, the sort's token for the same noise; its Triton lowering at a real vocabulary; the
sampler on it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from test_sampler import tensors
from test_sampler_filters import MARGIN, filter_cases, reference_keep
from test_top_k_top_p_kernel import mixed_rows

from jaxllm import sampler
from pallas_kernels.top_k_top_p_sample import top_k_top_p_sample


@jax.jit
def reference(x, g, top_k, top_p):
    kept = sampler.keep_from_threshold(x, sampler.top_k_top_p_threshold(x, top_k, top_p))
    return jnp.argmax(kept + g, axis=-1)


def check(logits: np.ndarray, top_k, top_p, seed: int = 0, **kernel_args) -> None:
    """The kernel's token equals the reference's on every row whose top-p cut-off is not within rounding
    of top_p (there the masses' summation order decides)."""
    g = np.random.default_rng(seed).gumbel(size=logits.shape).astype(np.float32)
    args = (jnp.asarray(logits), jnp.asarray(g), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))
    got = np.asarray(top_k_top_p_sample(*args, interpret=True, **kernel_args))
    want = np.asarray(reference(*args))
    assert got.dtype == np.int32
    for r in range(logits.shape[0]):
        if reference_keep(logits[r], int(top_k[r]), float(top_p[r]))[1] > MARGIN:
            assert got[r] == want[r], f"row {r}: top_k={top_k[r]} top_p={top_p[r]}"


@pytest.mark.parametrize("V, kernel_args", [(1, {}), (5, {}), (40, {}), (300, dict(block_v=128)),
                                            (300, dict(block_v=64))])  # tiles, the last partial
def test_kernel_equals_the_reference(V, kernel_args):
    rng = np.random.default_rng(V)
    R = 7
    for i, (top_k, top_p) in enumerate((
            ([0] * R, [0.9, 0.5, 0.95, 0.3, 0.9, 0.5, 0.99]),  # top-p alone
            ([1, 3, V, V + 3, 2, 0, 5], [1.0] * R),  # top-k alone
            ([0, 3, 1, 5, V, 2, 0], [1.0, 0.9, 0.5, 1e-6, 0.95, 0.7, 1.0]))):  # both, and off
        check(mixed_rows(rng, R, V), np.array(top_k), np.array(top_p), seed=i, **kernel_args)


@settings(max_examples=40, deadline=None)
@given(filter_cases())
def test_kernel_equals_the_reference_on_random_rows(case):
    logits, top_k, top_p = case
    check(logits, top_k, top_p)


def test_top_k_threshold_from_the_lanes_and_past_them():
    """The top-k threshold first comes from each lane's two largest logits. Rows whose largest logits sit
    in distinct lanes are confirmed by one count; rows with three or more of them in one lane (a lane is one
    position of every tile: 0, 64, 128, ... at block_v=64) need the search over the row after it."""
    rng = np.random.default_rng(3)
    V, R = 300, 6
    logits = rng.standard_normal((R, V)).astype(np.float32)
    logits[0, [0, 64, 128, 192]] = [9.0, 8.5, 8.0, 7.5]  # four of the largest in lane 0
    logits[1, [5, 69, 133]] = [6.0, 6.0, 6.0]  # three tied in lane 5
    logits[2, [1, 2, 3, 4]] = [9.0, 8.5, 8.0, 7.5]  # in four lanes
    logits[3, 256:] = 5.0 + rng.standard_normal(44)  # the partial last tile holds the top-k set
    top_k = np.array([3, 2, 3, 10, 40, 100])  # 40 and 100 exceed the lanes' 64 x 2 hardly / not at all
    for top_p in (0.9, 0.5):
        for seed in range(2):
            check(logits, top_k, np.full(R, top_p), seed=seed, block_v=64)
            check(logits, top_k, np.full(R, top_p), seed=seed, block_v=16)  # 32 lane values < top_k at 40, 100


def test_nucleus_rows_of_a_larger_vocabulary():
    """Rows of a few thousand logits, many tiles: a flat row (random weights: the nucleus is most of it) and
    peaked ones, where the first candidate is often outside the nucleus and later passes run."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 5000)) * np.array([[0.3], [2.0], [6.0], [3.0]])).astype(np.float32)
    for seed in range(3):
        check(logits, np.array([0, 50, 0, 0]), np.array([0.95, 0.9, 0.8, 0.3]), seed=seed)


def test_sample_with_the_kernel_gives_the_sorts_tokens(monkeypatch):
    """JAXLLM_TOP_P_REJECTION=1 draws with the kernel (the interpreter) inside `sample`, min_p and greedy
    rows included; the tokens are the sort's. Unset, the kernel runs on a GPU only."""
    rng = np.random.default_rng(2)
    R, V = 6, 200
    logits = jnp.asarray(rng.standard_normal((R, V)) * np.array([[0.5], [1], [2], [4], [1], [3]]), jnp.float32)
    params = dict(temperature=[0.8, 0.8, 1.2, 0.0, 0.7, 0.8], top_k=[0, 0, 20, 0, 5, 1],
                  top_p=[0.95, 0.8, 0.9, 1.0, 1.0, 0.5], min_p=[0, 0.05, 0, 0, 0, 0], seeds=np.arange(R))
    steps = [tensors(R, V, sample_index=np.arange(R) + 10 * i, **params) for i in range(4)]
    tokens = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("JAXLLM_TOP_P_REJECTION", mode)
        monkeypatch.setenv("JAXLLM_TOP_P_KERNEL", "0")
        draw = jax.jit(lambda x, t: sampler.sample(x, t, use_filters=True)[0].sampled)  # traced anew: reads the switch
        tokens[mode] = np.stack([np.asarray(draw(logits, t)) for t in steps])
    np.testing.assert_array_equal(tokens["1"], tokens["0"])
    monkeypatch.delenv("JAXLLM_TOP_P_REJECTION")
    assert sampler.use_rejection_kernel() == (jax.default_backend() == "gpu")  # unset: the GPU's default
    monkeypatch.setenv("JAXLLM_TOP_P_REJECTION", "yes")
    with pytest.raises(ValueError, match="JAXLLM_TOP_P_REJECTION='yes'"):
        sampler.use_rejection_kernel()


def test_kernel_lowers_for_triton():
    """The Pallas Triton lowering takes the kernel at Qwen3's vocabulary and 256 rows, one program a row."""
    rows = jax.ShapeDtypeStruct((256, 151936), jnp.float32)
    args = (rows, rows, jax.ShapeDtypeStruct((256,), jnp.int32), jax.ShapeDtypeStruct((256,), jnp.float32))
    text = top_k_top_p_sample.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    grid = [int(g) for g in re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", text).groups()]
    assert "xla.gpu.triton" in text and grid == [256, 1, 1]
