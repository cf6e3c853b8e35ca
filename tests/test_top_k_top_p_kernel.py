"""The top-k/top-p threshold kernel (the Pallas interpreter) against the sampler's jnp search, its Triton
lowering at a real vocabulary, and the sampler on it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from test_sampler import tensors
from test_sampler_filters import MARGIN, filter_cases, reference_keep

from jaxllm import sampler
from pallas_kernels.top_k_top_p import top_k_top_p_threshold, top_k_top_p_threshold_reference

reference = jax.jit(top_k_top_p_threshold_reference)


def check(logits: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, **kernel_args) -> None:
    """The kernel's threshold keys equal the reference's on every row whose top-p cut-off is not within
    rounding of top_p (there the masses' summation order decides, in the kernel as in the reference)."""
    args = (jnp.asarray(logits), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))
    got = np.asarray(top_k_top_p_threshold(*args, interpret=True, **kernel_args))
    want = np.asarray(reference(*args))
    assert got.dtype == np.uint32
    for r in range(logits.shape[0]):
        if reference_keep(logits[r], int(top_k[r]), float(top_p[r]))[1] > MARGIN:
            assert got[r] == want[r], f"row {r}: top_k={top_k[r]} top_p={top_p[r]}"


def mixed_rows(rng, R: int, V: int) -> np.ndarray:
    """[R, V]: flat (random weights), peaked, ties, banned tokens (-inf), one finite logit, all equal."""
    kinds = [
        lambda: rng.standard_normal(V) * 0.3,
        lambda: rng.standard_normal(V) * 8.0,
        lambda: rng.integers(-2, 3, V).astype(np.float64),
        lambda: np.where((rng.random(V) < 0.5) & (np.arange(V) > 0), -np.inf, rng.standard_normal(V)),
        lambda: np.where(np.arange(V) == rng.integers(V), 1.5, -np.inf),
        lambda: np.zeros(V),
        lambda: np.concatenate([[-0.0, 0.0], rng.standard_normal(V - 2)]) if V > 2 else -np.zeros(V),
    ]
    return np.stack([kinds[r % len(kinds)]() for r in range(R)]).astype(np.float32)


@pytest.mark.parametrize("V, kernel_args", [
    (1, {}),
    (5, {}),
    (40, {}),
    (300, dict(block_v=128)),  # three tiles, the last partial
    (300, dict(block_v=64, num_candidates=4)),
    (300, dict(block_v=256, num_candidates=2)),  # a binary search
])
def test_kernel_equals_the_reference(V, kernel_args):
    rng = np.random.default_rng(V)
    R = 7
    for top_k, top_p in (([0] * R, [0.9, 0.5, 0.95, 0.3, 0.9, 0.5, 0.99]),  # top-p alone
                         ([1, 3, V, V + 3, 2, 0, 5], [1.0] * R),  # top-k alone
                         ([0, 3, 1, 5, V, 2, 0], [1.0, 0.9, 0.5, 1e-6, 0.95, 0.7, 1.0])):  # both, and off
        check(mixed_rows(rng, R, V), np.array(top_k), np.array(top_p), **kernel_args)


@settings(max_examples=60, deadline=None)
@given(filter_cases())
def test_kernel_equals_the_reference_on_random_rows(case):
    logits, top_k, top_p = case
    check(logits, top_k, top_p)


def test_one_row_at_a_larger_vocabulary():
    """A row of a few thousand logits, many tiles of the default size."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 5000)) * np.array([[0.3], [2.0], [6.0]])).astype(np.float32)
    check(logits, np.array([0, 50, 0]), np.array([0.95, 0.9, 0.8]))


def test_sample_with_the_kernel_gives_the_sorts_tokens(monkeypatch):
    """JAXLLM_TOP_P_KERNEL=1 runs the kernel through the interpreter inside `sample`; the tokens are the sort's."""
    rng = np.random.default_rng(2)
    R, V = 6, 200
    logits = jnp.asarray(rng.standard_normal((R, V)) * np.array([[0.5], [1], [2], [4], [1], [3]]), jnp.float32)
    params = dict(temperature=0.8, top_k=[0, 0, 20, 0, 5, 1], top_p=[0.95, 0.8, 0.9, 1.0, 1.0, 0.5], seeds=np.arange(R))
    steps = [tensors(R, V, sample_index=np.arange(R) + 10 * i, **params) for i in range(4)]
    tokens = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("JAXLLM_TOP_P_KERNEL", mode)
        assert sampler.use_top_p_kernel() == (mode == "1")
        draw = jax.jit(lambda x, t: sampler.sample(x, t, use_filters=True)[0].sampled)  # traced anew: reads the switch
        tokens[mode] = np.stack([np.asarray(draw(logits, t)) for t in steps])
    np.testing.assert_array_equal(tokens["1"], tokens["0"])


def test_switch(monkeypatch):
    """The kernel is a GPU's default from KERNEL_MIN_ROWS rows, the sort the CPU's, and JAXLLM_TOP_P_SEARCH_WAYS picks the XLA search
    over the default; an unknown JAXLLM_TOP_P_KERNEL value is refused."""
    monkeypatch.delenv("JAXLLM_TOP_P_KERNEL", raising=False)
    monkeypatch.delenv("JAXLLM_TOP_P_SEARCH_WAYS", raising=False)
    assert sampler.use_top_p_kernel(256) == (jax.default_backend() == "gpu")
    assert not sampler.use_top_p_kernel(sampler.KERNEL_MIN_ROWS - 1)  # few rows: the sort
    monkeypatch.setenv("JAXLLM_TOP_P_KERNEL", "1")
    assert sampler.use_top_p_kernel(1)
    monkeypatch.delenv("JAXLLM_TOP_P_KERNEL")
    monkeypatch.setenv("JAXLLM_TOP_P_SEARCH_WAYS", "16")
    assert not sampler.use_top_p_kernel()
    monkeypatch.setenv("JAXLLM_TOP_P_KERNEL", "yes")
    with pytest.raises(ValueError, match="JAXLLM_TOP_P_KERNEL='yes'"):
        sampler.use_top_p_kernel()


def test_kernel_lowers_for_triton():
    """The Pallas Triton lowering takes the kernel at Qwen3's vocabulary and 256 rows, one program a row
    (the GPU compiles what this emits)."""
    args = (jax.ShapeDtypeStruct((256, 151936), jnp.float32), jax.ShapeDtypeStruct((256,), jnp.int32),
            jax.ShapeDtypeStruct((256,), jnp.float32))
    text = top_k_top_p_threshold.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    grid = [int(g) for g in re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", text).groups()]
    assert "xla.gpu.triton" in text and grid == [256, 1, 1]


@pytest.mark.parametrize("num_candidates", [15, 1])
def test_refuses_candidates_that_cannot_search(num_candidates):
    with pytest.raises(ValueError, match="powers of two, num_candidates at least 2"):
        top_k_top_p_threshold(jnp.zeros((1, 8)), jnp.zeros(1, jnp.int32), jnp.ones(1), num_candidates=num_candidates,
                              interpret=True)
