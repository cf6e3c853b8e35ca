"""The MoE grouped GEMM kernel (pallas_kernels/grouped_matmul.py) on the CPU: against jax.lax.ragged_dot
and exact float64 arithmetic under the Triton backend's interpreter, its tiles and row-tile bound,
lowered for the GPU at the MoE models' expert shapes, the dispatch in moe.grouped_matmul, and a tiny
MoE model's greedy tokens with the kernel forced on."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import moe
from pallas_kernels.grouped_matmul import (Tiles, choose_tiles, grouped_matmul, grouped_matmul_reference,
                                           num_row_tiles)


def exact(x, w, sizes) -> np.ndarray:
    """Each group's rows times its matrix in float64; rows past the groups are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


# (group sizes, rows, k, n, block_m): empty groups; all rows in one group; one row per group; a decode
# step (few rows, most groups empty); 17 rows a group at block_m 16, where the tiles reach the static
# bound on padding; rows that fill no whole tile; rows past the last group (zeros, as ragged_dot).
CASES = [([3, 0, 17, 5, 0], 25, 64, 128, None), ([0, 0, 40, 0], 40, 64, 128, None), ([1] * 8, 8, 64, 128, None),
         ([0, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], 4, 128, 64, None), ([17] * 4, 68, 64, 128, 16),
         ([5, 0, 4], 11, 64, 128, None)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("sizes,rows,k,n,block_m", CASES)
def test_kernel_matches_ragged_dot(sizes, rows, k, n, block_m, dtype):
    rng = np.random.default_rng(rows * k + len(sizes))
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(x, w, group_sizes, block_m=block_m, interpret=True)
    want = grouped_matmul_reference(x, w, group_sizes)
    assert got.shape == (rows, n) and got.dtype == dtype
    ref64 = exact(x, w, sizes)
    scale = np.abs(ref64).max()
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-5  # bf16 output rounding
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - ref64).max() < tol * scale and np.abs(want - ref64).max() < tol * scale
    assert np.abs(got - want).max() <= tol * scale
    assert not got[sum(sizes):].any()


def test_kernel_reads_one_layer_of_stacked_weights():
    """With a layer index, w holds every layer's experts [L, G, k, n] and the kernel multiplies by w[layer]
    (read in place: a model's layer loop passes the whole stack), equal to the call on the slice itself."""
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)
    x = jnp.asarray(rng.normal(size=(10, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 4, 64, 32)), jnp.float32)
    for layer in range(3):
        got = grouped_matmul(x, w, sizes, jnp.int32(layer), interpret=True)
        want = grouped_matmul(x, w[layer], sizes, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_allclose(np.asarray(grouped_matmul_reference(x, w, sizes, jnp.int32(layer))),
                                   np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \[G, k, n\], or \[L, G, k, n\] with a layer index"):
        grouped_matmul(x, w, sizes, interpret=True)
    with pytest.raises(ValueError, match="with a layer index"):
        grouped_matmul(x, w[0], sizes, jnp.int32(0), interpret=True)


def test_kernel_gathers_scales_and_places_rows():
    """row_src reads sorted row r from x[row_src[r]], row_scale multiplies its product, row_dst stores it at
    out[row_dst[r]]: the MoE layer's gather, routing weights and combine, equal to doing each in jnp around
    the plain call (and to float64 arithmetic)."""
    rng = np.random.default_rng(9)
    T, k, groups = 7, 3, 4
    experts = rng.integers(0, groups, (T, k))
    order = np.argsort(experts.reshape(-1), kind="stable").astype(np.int32)
    sizes = jnp.asarray(np.bincount(experts.reshape(-1), minlength=groups), jnp.int32)
    x = jnp.asarray(rng.normal(size=(T, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, groups, 64, 32)), jnp.float32)
    scale = jnp.asarray(rng.uniform(size=T * k), jnp.float32)
    src, dst = jnp.asarray(order // k), jnp.asarray(order)
    plain = np.asarray(grouped_matmul(x[src], w[1], sizes, interpret=True))
    got = np.asarray(grouped_matmul(x, w, sizes, jnp.int32(1), row_src=src, row_dst=dst, row_scale=scale,
                                    interpret=True))
    want = np.zeros_like(plain)
    want[order] = plain * np.asarray(scale)[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ref = grouped_matmul_reference(x, w, sizes, jnp.int32(1), row_src=src, row_dst=dst, row_scale=scale)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5)
    ref64 = exact(np.asarray(x)[order // k], np.asarray(w[1]), np.asarray(sizes)) * np.asarray(scale)[:, None]
    np.testing.assert_allclose(got[order], ref64, rtol=1e-4, atol=1e-4)
    gathered = np.asarray(grouped_matmul(x, w[0], sizes, row_src=src, interpret=True))
    np.testing.assert_allclose(gathered, np.asarray(grouped_matmul(x[src], w[0], sizes, interpret=True)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"row_scale \(5,\) must be \[21\]"):
        grouped_matmul(x, w[0], sizes, row_src=src, row_scale=scale[:5], interpret=True)


def test_experts_mlp_kernel_equals_ragged_dot(monkeypatch):
    """The MoE layer with the kernel's fused gather, weights and places equals the same layer on
    ragged_dot with the same steps done in jnp, at top-2 of 4 experts over 9 tokens."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(9, 64)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    w_gate_up = jnp.asarray(rng.normal(size=(3, 4, 64, 64)) * 0.1, jnp.float32)
    w_down = jnp.asarray(rng.normal(size=(3, 4, 32, 64)) * 0.1, jnp.float32)
    weights, experts = moe.route(x, router, 2, renormalize=True)
    run = lambda: np.asarray(jax.jit(lambda *a: moe.experts_mlp(*a, "silu", layer=jnp.int32(2)))(  # noqa: E731
        x, weights, experts, w_gate_up, w_down))
    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "0")
    ragged = run()
    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "1")
    kernel = run()
    np.testing.assert_allclose(kernel, ragged, rtol=1e-5, atol=1e-5)
    # and the meaning itself, token by token
    xn, wn, en = np.asarray(x, np.float64), np.asarray(weights, np.float64), np.asarray(experts)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    want = np.zeros((9, 64))
    for t in range(9):
        for slot in range(2):
            h = xn[t] @ np.asarray(w_gate_up[2, en[t, slot]], np.float64)
            want[t] += wn[t, slot] * ((silu(h[:32]) * h[32:]) @ np.asarray(w_down[2, en[t, slot]], np.float64))
    np.testing.assert_allclose(kernel, want, rtol=1e-4, atol=1e-4)


def test_tiles():
    """block_m follows the average rows a group (vLLM's H200 tables for Qwen3-30B-A3B and Mixtral); k and n
    take power-of-two tiles of at least 16 on the GPU, any in the interpreter; operands past int32
    offsets are refused; the row-tile bound is at most the rows (a decode step launches few programs)."""
    assert choose_tiles(8, 128, 2048, 1536) == Tiles(16, 64, 128, 4, 4)  # Qwen3-30B-A3B, one token
    assert choose_tiles(256 * 8, 128, 2048, 1536).block_m == 32  # 16 rows a group
    assert choose_tiles(512 * 2, 8, 4096, 28672).block_m == 128
    # wide column tiles where the grid fills the GPU twice over: Mixtral's gate|up in a prefill, not its down
    assert choose_tiles(2048 * 2, 8, 4096, 28672) == Tiles(128, 256, 64, 8, 3)
    assert choose_tiles(256 * 2, 8, 14336, 4096) == Tiles(128, 128, 64, 8, 3)
    assert choose_tiles(8192 * 8, 128, 768, 2048) == Tiles(128, 256, 64, 8, 3)
    assert choose_tiles(64, 60, 1408, 2048).block_k == 128 and choose_tiles(8192, 60, 1408, 2048).block_k == 64
    assert choose_tiles(48, 4, 64, 40) is None and choose_tiles(48, 4, 64, 40, interpret=True).block_n == 8
    assert choose_tiles(48, 4, 24, 64) is None and choose_tiles(48, 4, 24, 64, interpret=True).block_k == 8
    assert choose_tiles(65536, 8, 4096, 65536) is None  # out [65536, 65536]: past int32 offsets
    # Every layer's experts, 38.6 GB: the lowering's w offsets are 64-bit; only w's row index is int32.
    assert choose_tiles(8, 128, 2048, 1536, layers=48) == choose_tiles(8, 128, 2048, 1536)
    assert choose_tiles(8, 128, 2**17, 64, layers=128) is None
    assert num_row_tiles(8, 128, 16) == 8 and num_row_tiles(68, 4, 16) == 8 and num_row_tiles(4096, 8, 128) == 39


def test_kernel_refuses_bad_shapes():
    x, w, sizes = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 32), jnp.bfloat16), jnp.array([2, 2])
    with pytest.raises(ValueError, match="x has 48 columns but w is"):
        grouped_matmul(jnp.zeros((4, 48), jnp.bfloat16), w, sizes, interpret=True)
    with pytest.raises(ValueError, match="w is float32 but x is bfloat16"):
        grouped_matmul(x, w.astype(jnp.float32), sizes, interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, jnp.array([4]), interpret=True)
    with pytest.raises(ValueError, match="does not fit the kernel's tiles"):
        grouped_matmul(jnp.zeros((4, 24), jnp.bfloat16), jnp.zeros((2, 24, 32), jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="block_k=128 and block_n=32 must divide k=64"):
        grouped_matmul(x, w, sizes, block_k=128, interpret=True)


# (hidden, expert ffn, experts): the experts of Qwen3-30B-A3B, Mixtral-8x7B and Qwen1.5-MoE-A2.7B
EXPERT_SHAPES = [(2048, 768, 128), (4096, 14336, 8), (2048, 1408, 60)]


@pytest.mark.parametrize("hidden,ffn,experts", EXPERT_SHAPES)
def test_kernel_lowers_for_triton(hidden, ffn, experts):
    """The Pallas Triton lowering takes both expert matmuls at decode and prefill sizes (the GPU compiles
    what this emits); the grid is the row-tile bound times the column tiles."""
    for rows in (8, 8192):
        for k, n in ((hidden, 2 * ffn), (ffn, hidden)):
            args = (jax.ShapeDtypeStruct((rows, k), jnp.bfloat16), jax.ShapeDtypeStruct((experts, k, n), jnp.bfloat16),
                    jax.ShapeDtypeStruct((experts,), jnp.int32))
            text = grouped_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            tiles = choose_tiles(rows, experts, k, n)
            grid = int(re.search(r"grid_x = (\d+) : i32", text).group(1))
            assert "xla.gpu.triton" in text
            assert grid == num_row_tiles(rows, experts, tiles.block_m) * (n // tiles.block_n)


def test_dispatch(monkeypatch):
    """JAXLLM_MOE_KERNEL: 1 puts moe.grouped_matmul on the kernel (the interpreter on a CPU) with ragged_dot's
    result; 0 and the CPU default keep ragged_dot; on a GPU the default takes 16-bit operands whose shape
    fits the tiles; anything else is refused."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(10, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(4, 64, 32)), jnp.bfloat16)
    sizes = jnp.array([3, 0, 6, 1], jnp.int32)
    calls = []
    monkeypatch.setattr(moe, "grouped_matmul_kernel", lambda *a, **k: calls.append(k) or grouped_matmul(*a, **k))
    run = lambda: jax.jit(lambda *a: moe.grouped_matmul(*a))(x, w, sizes)  # a fresh trace: the switch is read then
    monkeypatch.delenv("JAXLLM_MOE_KERNEL", raising=False)
    ragged = run()
    assert not calls
    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "1")
    kernel = run()
    assert calls and calls[0]["interpret"] is True
    kernel, ragged = np.asarray(kernel, np.float32), np.asarray(ragged, np.float32)
    assert np.abs(kernel - ragged).max() < 2e-2 * np.abs(ragged).max()
    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "0")
    assert not moe.use_grouped_kernel(x, w)
    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "yes")
    with pytest.raises(ValueError, match="JAXLLM_MOE_KERNEL='yes'"):
        moe.use_grouped_kernel(x, w)

    monkeypatch.delenv("JAXLLM_MOE_KERNEL")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rows = jax.ShapeDtypeStruct((64, 2048), jnp.bfloat16)
    assert moe.use_grouped_kernel(rows, jax.ShapeDtypeStruct((128, 2048, 1536), jnp.bfloat16))
    assert not moe.use_grouped_kernel(jax.ShapeDtypeStruct((64, 2048), jnp.float32),
                                      jax.ShapeDtypeStruct((128, 2048, 1536), jnp.float32))
    assert not moe.use_grouped_kernel(rows, jax.ShapeDtypeStruct((128, 2048, 24), jnp.bfloat16))  # tiles


def test_lowers_for_triton_with_stacked_weights():
    """Qwen3-30B-A3B's 48 layers of experts (past 4 GB) and a layer index lower to one Triton call whose grid
    is that of one layer's weights."""
    rows, experts, k, n = 64, 128, 2048, 1536
    args = (jax.ShapeDtypeStruct((rows, k), jnp.bfloat16), jax.ShapeDtypeStruct((48, experts, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((experts,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    text = grouped_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    tiles = choose_tiles(rows, experts, k, n)
    assert text.count("xla.gpu.triton") == 1
    pairs = jax.ShapeDtypeStruct((rows * 8,), jnp.int32)  # the fused gather, weights and places lower too
    fused = grouped_matmul.trace(args[0], args[1], args[2], args[3], pairs, pairs,
                                 jax.ShapeDtypeStruct((rows * 8,), jnp.float32)).lower(lowering_platforms=("cuda",))
    assert fused.as_text().count("xla.gpu.triton") == 1
    assert int(re.search(r"grid_x = (\d+) : i32", text).group(1)) == num_row_tiles(rows, experts, tiles.block_m) * (
        n // tiles.block_n)


def test_layer_loop_leaves_the_experts_whole(monkeypatch):
    """The MoE layer loop scans every weight but the experts, which enter the scan whole (loop-invariant)
    and are read at the layer index: a scanned [L, ...] operand is sliced each layer, and XLA copies a
    slice that feeds the kernel (half the decode step at Qwen3-30B-A3B's shape on an H200)."""
    from jaxllm.kv_cache import AttentionMetadata, KVCache
    from jaxllm.models import mixtral
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    monkeypatch.setenv("JAXLLM_MOE_KERNEL", "1")
    config = model_shape_config("qwen3-30b-a3b", num_layers=3, hidden_size=64, num_heads=2, num_kv_heads=1,
                                head_dim=32, moe_intermediate_size=32, num_experts=8, vocab_size=128)
    params = jax.eval_shape(lambda: init_random_weights(config, jax.random.PRNGKey(0)))
    experts = {params["layers"][name].shape for name in ("w_gate_up", "w_down")}
    T, S = 4, 2
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    cache = jax.eval_shape(lambda: KVCache.create(config, num_blocks=4, block_size=16))
    md = AttentionMetadata(slot_mapping=i32(T), block_tables=i32(S, 2), seq_lens=i32(S), query_start_loc=i32(S + 1),
                           logits_indices=i32(S))
    jaxpr = jax.make_jaxpr(lambda *a: mixtral.forward_hidden(*a, config))(params, i32(T), i32(T), cache, md)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    scan = scans[0]
    n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
    consts = {v.aval.shape for v in scan.invars[:n_consts]}
    scanned = {v.aval.shape for v in scan.invars[n_consts + n_carry:]}
    assert experts <= consts and not experts & scanned


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_model_greedy_with_kernel(family, tmp_path, monkeypatch):
    """A tiny Qwen2-MoE checkpoint (with its shared expert) and a tiny Mixtral one generate the same greedy
    tokens, and the same float32 logits to 1e-5, with both expert matmuls of every layer on the kernel
    (interpreted) as with ragged_dot."""
    from hf_models import save_tiny_model
    from jaxllm.loader import load_model
    from test_model_numerics import PROMPT_LEN, greedy_under_env, random_prompt

    save_tiny_model(family, tmp_path)
    config, params = load_model(tmp_path)
    prompt = random_prompt(PROMPT_LEN, seed=1)
    calls = []
    monkeypatch.setattr(moe, "grouped_matmul_kernel", lambda *a, **k: calls.append(1) or grouped_matmul(*a, **k))

    def greedy(mode: str):
        return greedy_under_env(monkeypatch, "JAXLLM_MOE_KERNEL", mode, config, params, prompt, 5)

    ragged_tokens, ragged_logits = greedy("0")
    assert not calls
    kernel_tokens, kernel_logits = greedy("1")
    assert len(calls) == 2  # both expert matmuls of the layer body (traced once under the scan)
    assert kernel_tokens == ragged_tokens
    assert np.abs(kernel_logits - ragged_logits).max() < 1e-5 * np.abs(ragged_logits).max()
