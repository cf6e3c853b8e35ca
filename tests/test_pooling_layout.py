"""pooling_layout.py: the planner's steps stay within their shapes, every shape it produces is one of
`PoolingBuckets.shapes()` (what is compiled at start), and the step arrays put each token in its place."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.pooling_layout import PoolingBuckets, StepShape, aligned_starts


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(16, 4096), max_seqs=st.integers(1, 300), model_len_frac=st.floats(0.01, 1.0),
       chunked=st.booleans(), data=st.data())
def test_every_planned_step_is_a_precompiled_shape_and_holds_its_sequences(budget, max_seqs, model_len_frac,
                                                                            chunked, data):
    max_model_len = max(1, int(budget * model_len_frac))
    buckets = PoolingBuckets(budget, max_seqs, max_model_len=max_model_len, chunked=chunked)
    lengths = data.draw(st.lists(st.integers(1, max_model_len), min_size=1, max_size=60))
    shapes = set(buckets.shapes())
    steps = buckets.plan(lengths)
    assert [i for s in steps for i in s.indices] == list(range(len(lengths)))  # all, once, in order
    for s in steps:
        T, S, C = s.shape.num_tokens, s.shape.num_seqs, s.shape.chunk
        assert s.shape in shapes
        assert len(s.indices) <= min(S, max_seqs) and T <= budget
        assert list(s.lengths) == [lengths[i] for i in s.indices]
        ends = s.starts + s.lengths
        assert (s.starts[1:] >= ends[:-1]).all() and ends[-1] <= T  # no overlap, within the step
        if C is None:
            assert (s.starts[1:] == ends[:-1]).all() and s.starts[0] == 0  # decoders: back to back
        else:
            assert (s.starts // C == (ends - 1) // C).all()  # no sequence crosses a chunk
        # the smallest token bucket that holds the step's tokens, unless the chunks' ends forced a larger one
        assert T == buckets.token_bucket(int(ends[-1]))


def test_plan_packs_by_budget_and_sequence_cap():
    buckets = PoolingBuckets(64, 3, max_model_len=64)
    steps = buckets.plan([5, 10, 30, 40, 1, 1, 1, 1])
    # 5+10+30 fit (30 starts the second chunk of 32); 40 does not; then the cap of 3 sequences
    assert [s.indices for s in steps] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [s.shape for s in steps] == [StepShape(64, 3, 32), StepShape(64, 3, 64), StepShape(16, 3, 16)]
    assert list(steps[0].starts) == [0, 5, 32]
    # a longer chunk packs three 300-token inputs into one 1024-token step instead of two steps
    (step,) = PoolingBuckets(1024, 8).plan([300, 300, 300])
    assert step.shape == StepShape(1024, 8, 1024) and list(step.starts) == [0, 300, 600]
    # with chunks of at most 512 (max_model_len), each 300-token input starts a chunk
    steps = PoolingBuckets(1024, 8, max_model_len=512).plan([300, 300, 300])
    assert [list(s.starts) for s in steps] == [[0, 512], [0]]
    assert [s.shape for s in steps] == [StepShape(1024, 8, 512), StepShape(512, 8, 512)]


def test_shapes_are_one_per_token_bucket_and_chunk():
    buckets = PoolingBuckets(2000, 256, max_model_len=512)
    assert buckets.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2000)
    assert buckets.chunks(16) == (16,) and buckets.chunks(2000) == (16, 32, 64, 128, 256, 512)
    assert len(buckets.shapes()) == 1 + 2 + 3 + 4 + 5 + 6 + 6 + 6
    assert StepShape(2000, 256, 512) in buckets.shapes() and StepShape(16, 16, 16) in buckets.shapes()
    assert PoolingBuckets(64, 4, chunked=False).shapes() == [StepShape(16, 4, None), StepShape(32, 4, None),
                                                             StepShape(64, 4, None)]


def test_step_arrays_place_every_token():
    (step,) = PoolingBuckets(64, 4, max_model_len=20).plan([13, 20, 2])
    assert step.shape == StepShape(64, 4, 32) and list(step.starts) == [0, 32, 52]  # 20 would cross 32
    seg = step.segment_ids
    assert (seg[:13] == 0).all() and (seg[13:32] == -1).all() and (seg[32:52] == 1).all()
    assert list(seg[52:55]) == [2, 2, -1] and (seg[54:] == -1).all()
    assert list(step.positions[32:35]) == [0, 1, 2] and step.positions[51] == 19 and step.positions[53] == 1
    ids = step.scatter(np.arange(1, 36))
    assert list(ids[11:14]) == [12, 13, 0] and ids[32] == 14 and list(ids[52:55]) == [34, 35, 0]
    assert list(step.per_seq(step.lengths)) == [13, 20, 2, 0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        PoolingBuckets(64, 0)
    with pytest.raises(ValueError, match="max_model_len=128"):
        PoolingBuckets(64, 4, max_model_len=128)
    with pytest.raises(ValueError, match="input 1 has 0 tokens"):
        PoolingBuckets(64, 4).plan([3, 0])
    with pytest.raises(ValueError, match="input 0 has 33 tokens.*32 \\(max_model_len\\)"):
        PoolingBuckets(64, 4, max_model_len=32).plan([33])


def test_aligned_starts():
    assert aligned_starts([10, 10, 10], 16) == ([0, 16, 32], 42)
    assert aligned_starts([10, 6, 16], 16) == ([0, 10, 16], 32)
    assert aligned_starts([10, 10], None) == ([0, 10], 20)
