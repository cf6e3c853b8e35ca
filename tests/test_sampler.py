"""The sampler's logits processors as pure functions on small logit vectors, and its statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.sampler import (PenaltyState, SamplingTensors, apply_allowed_token_ids, apply_min_p, apply_penalties,
                            apply_sparse_bias, apply_top_k_top_p, pack_sampling_tensors, sample,
                            unpack_sampling_tensors)

NEG = -np.inf


def tensors(R: int, V: int, **overrides) -> SamplingTensors:
    """Neutral parameters (random sampling at temperature 1, nothing else) with overrides."""
    t = dict(temperature=np.ones(R, np.float32), top_k=np.zeros(R, np.int32), top_p=np.ones(R, np.float32),
             min_p=np.zeros(R, np.float32), seeds=np.zeros(R, np.uint32), sample_index=np.zeros(R, np.int32),
             presence_penalty=np.zeros(R, np.float32), frequency_penalty=np.zeros(R, np.float32),
             repetition_penalty=np.ones(R, np.float32), penalty_rows=np.full(R, -1, np.int32),
             count_rows=np.full(R, -1, np.int32), bias_ids=np.zeros((R, 0), np.int32),
             bias_values=np.zeros((R, 0), np.float32), allowed_ids=np.zeros((R, 0), np.int32),
             has_allowed=np.zeros(R, bool))
    for k, v in overrides.items():
        t[k] = np.asarray(v, t[k].dtype) if np.ndim(v) else np.full(t[k].shape, v, t[k].dtype)
    return SamplingTensors(**t)


_sample = jax.jit(sample, static_argnames=("use_filters", "random_rows", "num_logprobs"))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 5), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_packed_sampling_tensors_unpack_bit_for_bit(R, K, A, seed):
    """A step's SamplingTensors go to the device as one int32 array; each field comes back with its dtype
    and every bit (-inf bans, NaN, seeds above 2**31, flags)."""
    rng = np.random.default_rng(seed)
    floats = lambda *shape: rng.choice(np.array([0.0, 1.0, -2.5, 0.95, NEG, np.inf, np.nan, 1e-30], np.float32),  # noqa: E731
                                       shape)
    ints = lambda *shape: rng.integers(-2**31, 2**31, shape, dtype=np.int64).astype(np.int32)  # noqa: E731
    host = SamplingTensors(
        temperature=floats(R), top_k=ints(R), top_p=floats(R), min_p=floats(R),
        seeds=rng.integers(0, 2**32, R, dtype=np.uint64).astype(np.uint32), sample_index=ints(R),
        presence_penalty=floats(R), frequency_penalty=floats(R), repetition_penalty=floats(R),
        penalty_rows=ints(R), count_rows=ints(R), bias_ids=ints(R, K), bias_values=floats(R, K),
        allowed_ids=ints(R, A), has_allowed=rng.integers(0, 2, R).astype(bool))
    packed = pack_sampling_tensors(host)
    assert packed.dtype == np.int32 and packed.shape == (R * (12 + 2 * K + A),)
    device = jax.jit(unpack_sampling_tensors, static_argnums=(1, 2))(packed, R, (K, A))
    for name in host.__dataclass_fields__:
        want, got = getattr(host, name), np.asarray(getattr(device, name))
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)


def test_penalties_follow_vllm_formula():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    prompt_mask = jnp.array([[True, False, False, False]])
    counts = jnp.array([[0, 2, 1, 0]])
    out = apply_penalties(logits, prompt_mask, counts, presence_penalty=jnp.array([0.25]),
                          frequency_penalty=jnp.array([0.5]), repetition_penalty=jnp.array([2.0]))
    # token 0: in the prompt, positive: 2 / 2. token 1: generated twice, negative: -1 * 2 - 0.5 * 2 - 0.25.
    # token 2: generated once: 0.5 / 2 - 0.5 - 0.25. token 3: untouched.
    np.testing.assert_allclose(out, [[1.0, -3.25, -0.5, 3.0]])


def test_penalties_off_are_identity():
    logits = jnp.array([[2.0, -1.0, NEG, 3.0]])
    out = apply_penalties(logits, jnp.ones((1, 4), bool), jnp.full((1, 4), 3), jnp.zeros(1), jnp.zeros(1), jnp.ones(1))
    np.testing.assert_array_equal(out, logits)


def test_min_p_is_relative_to_top_probability():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, jnp.array([0.4, 0.0]))  # threshold 0.2; 0 = off
    assert np.isfinite(out[0]).tolist() == [True, True, False, False]
    assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("top_k, top_p, kept", [
    (0, 1.0, [True, True, True, True]),
    (2, 1.0, [True, True, False, False]),
    (1, 1.0, [True, False, False, False]),
    (0, 0.7, [True, True, False, False]),  # mass before each rank: 0, .5, .8, .95
    (0, 0.5, [True, False, False, False]),
    (0, 0.9, [True, True, True, False]),
    (3, 0.6, [True, True, False, False]),  # top_p over the renormalised top-3
    (0, 1e-6, [True, False, False, False]),  # always at least one
])
def test_top_k_top_p(top_k, top_p, kept):
    logits = jnp.log(jnp.array([[0.3, 0.5, 0.05, 0.15]]))[:, jnp.array([1, 0, 3, 2])]  # [.5, .3, .15, .05]
    out = apply_top_k_top_p(logits, jnp.array([top_k]), jnp.array([top_p]))
    assert np.isfinite(out[0]).tolist() == kept
    np.testing.assert_array_equal(np.where(kept, out[0], 0), np.where(kept, logits[0], 0))


def test_top_k_keeps_ties_with_the_kth():
    out = apply_top_k_top_p(jnp.array([[1.0, 2.0, 2.0, 0.0]]), jnp.array([1]), jnp.array([1.0]))
    assert np.isfinite(out[0]).tolist() == [False, True, True, False]


def test_sparse_bias_and_allowed_ids():
    logits = jnp.zeros((2, 5))
    V = 5
    out = apply_sparse_bias(logits, jnp.array([[1, 3, V], [0, V, V]]), jnp.array([[2.5, NEG, 9.0], [-1.0, 9.0, 9.0]]))
    np.testing.assert_array_equal(out, [[0, 2.5, 0, NEG, 0], [-1.0, 0, 0, 0, 0]])
    out = apply_allowed_token_ids(logits, jnp.array([[2, 4, V], [0, V, V]]), jnp.array([True, False]))
    np.testing.assert_array_equal(out, [[NEG, NEG, 0, NEG, 0], [0, 0, 0, 0, 0]])


def test_sample_applies_bias_penalty_and_counts_on_device():
    V = 6
    logits = jnp.array([[0.0, 5.0, 4.9, 1.0, 0.0, 0.0]] * 2)
    state = PenaltyState.create(4, V)
    t = tensors(2, V, temperature=0.0, presence_penalty=[1.0, 0.0], penalty_rows=[2, -1], count_rows=[2, -1],
                bias_ids=np.array([[3, V], [1, V]]), bias_values=np.array([[0.5, 0.0], [NEG, 0.0]]))
    out, state = _sample(logits, t, state, use_filters=False)
    assert out.sampled.tolist() == [1, 2]  # row 1: token 1 banned by its bias
    assert int(state.output_counts[2, 1]) == 1 and int(state.output_counts.sum()) == 1
    out, state = _sample(logits, t, state, use_filters=False)  # row 0 now pays presence 1.0 on token 1
    assert out.sampled.tolist() == [2, 2]
    # Logprobs are of the raw logits, whatever the processing.
    np.testing.assert_allclose(out.logprob, jax.nn.log_softmax(logits)[:, 2], rtol=1e-6)


def test_logprobs_rank_and_top():
    V = 5
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0, -1.0]])
    t = tensors(1, V, temperature=0.0, bias_ids=np.array([[1, 2]]), bias_values=np.array([[NEG, NEG]]))
    out, _ = _sample(logits, t, None, use_filters=False, num_logprobs=2)
    raw = jax.nn.log_softmax(logits)[0]
    assert int(out.sampled[0]) == 0 and int(out.rank[0]) == 3
    assert out.top_ids[0].tolist() == [1, 2]
    np.testing.assert_allclose(out.top_logprobs[0], raw[jnp.array([1, 2])], rtol=1e-6)


def test_temperature_one_matches_softmax():
    """20000 draws (one row each, same logits, different sample index) against softmax: chi-square."""
    V, N = 6, 20000
    logits = jnp.array([1.0, 0.5, 0.0, -0.5, 2.0, -3.0])
    t = tensors(N, V, seeds=7, sample_index=np.arange(N))
    out, _ = _sample(jnp.broadcast_to(logits, (N, V)), t, None, use_filters=False)
    counts = np.bincount(np.asarray(out.sampled), minlength=V)
    expected = N * np.asarray(jax.nn.softmax(logits), np.float64)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5, (counts, expected, chi2)  # chi-square, 5 dof, p = 0.001
    # Temperature 2 flattens: still a softmax, of logits / 2.
    out, _ = _sample(jnp.broadcast_to(logits, (N, V)), tensors(N, V, temperature=2.0, seeds=7,
                                                                sample_index=np.arange(N)), None, use_filters=False)
    counts = np.bincount(np.asarray(out.sampled), minlength=V)
    expected = N * np.asarray(jax.nn.softmax(logits / 2), np.float64)
    assert ((counts - expected) ** 2 / expected).sum() < 20.5


def test_top_k_one_and_tiny_top_p_are_greedy():
    R, V = 64, 50
    logits = jax.random.normal(jax.random.PRNGKey(0), (R, V)) * 3
    greedy = np.argmax(logits, axis=-1)
    for overrides in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        t = tensors(R, V, seeds=np.arange(R), **overrides)
        out, _ = _sample(logits, t, None, use_filters=True)
        np.testing.assert_array_equal(out.sampled, greedy)


def test_top_k_samples_only_the_top_k():
    R, V = 2000, 10
    logits = jnp.broadcast_to(jnp.arange(V, dtype=jnp.float32) * 0.1, (R, V))
    out, _ = _sample(logits, tensors(R, V, top_k=3, sample_index=np.arange(R)), None, use_filters=True)
    assert set(np.asarray(out.sampled).tolist()) == {7, 8, 9}


def test_row_depends_only_on_its_seed_and_index():
    V = 32
    logits = jax.random.normal(jax.random.PRNGKey(1), (8, V))
    t = tensors(8, V, seeds=np.arange(8) + 100, sample_index=np.arange(8) * 3)
    out, _ = _sample(logits, t, None, use_filters=False)
    perm = np.array([3, 1, 7, 0, 2, 6, 5, 4])
    t2 = tensors(8, V, seeds=(np.arange(8) + 100)[perm], sample_index=(np.arange(8) * 3)[perm])
    out2, _ = _sample(logits[perm], t2, None, use_filters=False)
    np.testing.assert_array_equal(np.asarray(out.sampled)[perm], out2.sampled)


def test_sampling_flags_come_from_the_rows_parameters():
    from jaxllm.model_runner import sampling_flags

    R = 4
    assert sampling_flags(tensors(R, 8, temperature=0.0)) == (False, False)
    # A greedy row's top_k does not matter: filters never change an argmax.
    assert sampling_flags(tensors(R, 8, temperature=0.0, top_k=5)) == (False, False)
    assert sampling_flags(tensors(R, 8, temperature=[0.0, 0.7, 0.0, 0.0])) == (True, False)
    assert sampling_flags(tensors(R, 8, temperature=[0.0, 0.7, 0.0, 0.0], top_p=[1.0, 0.9, 1.0, 1.0])) == (True, True)
    assert sampling_flags(tensors(R, 8, temperature=[0.0, 0.7, 0.0, 0.0], min_p=[0.3, 0.0, 0.0, 0.0])) == (True, False)


def test_static_flags_give_the_same_samples_as_the_general_program():
    """The host picks the cheapest program for the batch: all-greedy draws no noise, filters only when
    a random row truncates. Each cheap program must sample exactly what the general one samples."""
    R, V = 6, 50
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((R, V)) * 3, jnp.float32)
    greedy = tensors(R, V, temperature=0.0, seeds=np.arange(R), sample_index=np.arange(R))
    general, _ = _sample(logits, greedy, None, use_filters=True, random_rows=True)
    cheap, _ = _sample(logits, greedy, None, use_filters=False, random_rows=False)
    np.testing.assert_array_equal(cheap.sampled, np.argmax(np.asarray(logits), -1))
    np.testing.assert_array_equal(cheap.sampled, general.sampled)
    np.testing.assert_allclose(cheap.logprob, general.logprob, rtol=1e-6)
    mixed = tensors(R, V, temperature=[0.0, 1.0, 0.5, 0.0, 2.0, 1.0], seeds=np.arange(R), sample_index=np.arange(R))
    general, _ = _sample(logits, mixed, None, use_filters=True, random_rows=True)
    cheap, _ = _sample(logits, mixed, None, use_filters=False, random_rows=True)
    np.testing.assert_array_equal(cheap.sampled, general.sampled)
    # The logprob is the raw log-softmax of the sampled token.
    want = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(R), cheap.sampled]
    np.testing.assert_allclose(cheap.logprob, want, rtol=1e-5, atol=1e-6)
