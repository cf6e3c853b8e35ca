"""The sort-free top-k / top-p / min-p filters against a straightforward numpy reference (a sort in float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxllm import sampler
from jaxllm.sampler import ordered_key

apply_min_p = jax.jit(sampler.apply_min_p)
apply_top_k_top_p = jax.jit(sampler.apply_top_k_top_p_search)
apply_top_k_top_p_sorted = jax.jit(sampler.apply_top_k_top_p_sorted)

MARGIN = 1e-5  # cases whose cut-off lies this close to top_p (or min_p) depend on rounding: skipped


def reference_keep(x: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, float]:
    """vLLM's filter on one row by a sort: (kept mask, how far top_p lies from the nearest cut-off)."""
    x = x.astype(np.float64)
    V = x.size
    desc = np.sort(x)[::-1]
    k = V if top_k <= 0 else min(top_k, V)
    kept = x >= desc[k - 1]  # ties with the k-th are kept
    if top_p >= 1.0:
        return kept, 1.0
    top = x[kept].max()
    weights = np.where(kept, np.exp(x - top), 0.0)
    total = weights.sum()
    values = np.unique(x[kept])[::-1]  # distinct kept values, descending
    mass_at_least = np.array([weights[x >= v].sum() / total for v in values])
    # The nucleus ends at the first value whose cumulative mass reaches top_p (the smallest prefix).
    reached = np.nonzero(mass_at_least >= top_p)[0]
    cut = values[reached[0]] if reached.size else values[-1]
    return kept & (x >= cut), float(np.min(np.abs(mass_at_least - top_p)))


row_values = st.one_of(
    st.floats(-30, 30, width=32, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, -1.0, 2.5, -np.inf]),  # ties and masked tokens
)


@st.composite
def filter_cases(draw):
    # One shape for every example: each new shape would compile the filter again.
    R, V = 3, draw(st.sampled_from([1, 40]))
    logits = np.array(draw(st.lists(st.lists(row_values, min_size=V, max_size=V), min_size=R, max_size=R)),
                      np.float32)
    for r in range(R):  # at least one finite logit per row, as after any processor
        if not np.isfinite(logits[r]).any():
            logits[r, draw(st.integers(0, V - 1))] = draw(st.floats(-30, 30, width=32, allow_subnormal=False))
    top_k = np.array(draw(st.lists(st.integers(0, V + 2), min_size=R, max_size=R)), np.int32)
    top_p = np.array(draw(st.lists(st.one_of(st.just(1.0), st.just(1e-6), st.floats(0.0, 1.0, width=32, exclude_min=True)),
                                   min_size=R, max_size=R)), np.float32)
    return logits, top_k, top_p


@settings(max_examples=80, deadline=None)
@given(filter_cases())
def test_top_k_top_p_equals_a_sort_in_float64(case):
    logits, top_k, top_p = case
    args = (jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))
    outs = (np.asarray(apply_top_k_top_p(*args)), np.asarray(apply_top_k_top_p_sorted(*args)))
    for out, r in ((out, r) for out in outs for r in range(logits.shape[0])):
        want, margin = reference_keep(logits[r], int(top_k[r]), float(top_p[r]))
        assume(margin > MARGIN)
        got = np.isfinite(out[r]) | (np.isneginf(logits[r]) & want)  # a kept -inf stays -inf
        np.testing.assert_array_equal(got, want, err_msg=f"row {r}: top_k={top_k[r]} top_p={top_p[r]}")
        np.testing.assert_array_equal(out[r][want], logits[r][want])  # kept logits unchanged


@settings(max_examples=40, deadline=None)
@given(filter_cases())
def test_sort_free_filter_equals_the_sorted_one(case):
    logits, top_k, top_p = case
    args = (jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))
    new, old = np.asarray(apply_top_k_top_p(*args)), np.asarray(apply_top_k_top_p_sorted(*args))
    for r in range(logits.shape[0]):
        assume(reference_keep(logits[r], int(top_k[r]), float(top_p[r]))[1] > MARGIN)
        np.testing.assert_array_equal(new[r], old[r])


@settings(max_examples=60, deadline=None)
@given(filter_cases(), st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, width=32)),
                                min_size=3, max_size=3))
def test_min_p_equals_probabilities_against_the_top(case, min_p):
    logits = case[0]
    min_p = np.array(min_p[:logits.shape[0]], np.float32)
    out = np.asarray(apply_min_p(jnp.asarray(logits), jnp.asarray(min_p)))
    for r in range(logits.shape[0]):
        x = logits[r].astype(np.float64)
        ratio = np.exp(x - x.max())  # probability over the top probability
        assume(min_p[r] == 0 or np.all(np.abs(ratio - min_p[r]) > MARGIN))  # 0: nothing is masked
        np.testing.assert_array_equal(np.isfinite(out[r]), np.isfinite(x) & (ratio >= min_p[r]))


def test_ordered_key_keeps_float_order():
    x = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(ordered_key(jnp.asarray(x))).astype(np.int64)
    assert np.all(np.diff(keys[:5]) > 0) and np.all(np.diff(keys[5:]) > 0)
    assert keys[4] == keys[5]  # -0.0 == 0.0


def test_large_vocabulary_with_a_flat_distribution():
    """A near-uniform row over a real vocabulary (random weights): the nucleus holds most tokens."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 151936)) * 0.3).astype(np.float32)
    top_k, top_p = np.array([0, 50], np.int32), np.array([0.95, 0.95], np.float32)
    out = np.asarray(apply_top_k_top_p(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(2):
        want, _ = reference_keep(logits[r], int(top_k[r]), float(top_p[r]))
        np.testing.assert_array_equal(np.isfinite(out[r]), want)
