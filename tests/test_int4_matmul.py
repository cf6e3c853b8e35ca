"""The int4 weight-only kernel (pallas_kernels/int4_matmul.py) on the CPU: against its jnp reference and
exact float64 arithmetic under the Triton backend's interpreter, lowered for the GPU at Llama-3-8B
shapes, the packed layout and the loader's repacking (AWQ's interleaved words, GPTQ act-order), the
dispatch in quant.matmul, and an AWQ checkpoint's greedy tokens with the kernel forced on."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.loader.quantized import AWQ_ORDER, UnpackedLinear, int4_layout, unpack_int4 as unpack_checkpoint_words
from jaxllm.models import quant
from jaxllm.models.quant import QuantizedWeight, dequantize, matmul, quantize_array, use_int4_kernel
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_reference, pack_int4, unpack_int4


def random_int4(rng, n_in: int, n_out: int, group: int, scale_dtype=jnp.float16):
    """(values [in, out] 0..15, packed q, scale, zero [in / group, out])."""
    values = rng.integers(0, 16, (n_in, n_out))
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (n_in // group, n_out)), scale_dtype)
    zero = jnp.asarray(rng.integers(0, 16, (n_in // group, n_out)), scale_dtype)
    return values, jnp.asarray(pack_int4(values)), scale, zero


def exact(x, values, scale, zero) -> np.ndarray:
    """x @ ((values - zero) * scale) in float64."""
    group = values.shape[0] // scale.shape[0]
    s, z = (np.repeat(np.asarray(a, np.float64), group, axis=0) for a in (scale, zero))
    return np.asarray(x, np.float64) @ ((values - z) * s)


# (M, in, out, group, num_splits): one to three row tiles, groups smaller and larger than a K block,
# split-K and not, the split-K default choice (None).
CASES = [(1, 512, 64, 128, None), (5, 512, 128, 32, 2), (16, 1024, 32, 128, 4), (32, 256, 64, 32, 1),
         (40, 128, 16, 32, None)]


@pytest.mark.parametrize("m,n_in,n_out,group,num_splits", CASES)
def test_kernel_matches_reference(m, n_in, n_out, group, num_splits):
    rng = np.random.default_rng(m * n_in + group)
    values, q, scale, zero = random_int4(rng, n_in, n_out, group)
    x = jnp.asarray(rng.normal(size=(m, n_in)), jnp.bfloat16)
    got = int4_matmul(x, q, scale, zero, num_splits=num_splits, interpret=True)
    want = int4_matmul_reference(x, q, scale, zero)
    assert got.shape == (m, n_out) and got.dtype == jnp.bfloat16
    ref64 = exact(x, values, scale, zero)
    err = lambda y: np.abs(np.asarray(y, np.float64) - ref64).max() / np.abs(ref64).max()
    assert err(got) < 8e-3 and err(want) < 8e-3  # bf16 output rounding
    assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() <= 1e-2 * np.abs(ref64).max()


def test_kernel_float32_and_bfloat16_scales():
    """f32 activations come out f32 (to f32 rounding); bf16 scales and zeros are read as well as f16."""
    rng = np.random.default_rng(1)
    values, q, scale, zero = random_int4(rng, 256, 32, 64, scale_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    got = int4_matmul(x, q, scale, zero, interpret=True)
    assert got.dtype == jnp.float32
    ref64 = exact(x, values, scale, zero)
    assert np.abs(np.asarray(got, np.float64) - ref64).max() < 1e-4 * np.abs(ref64).max()


def test_kernel_float16_activations():
    """f16 activations take the folded path (base 1024 + nibble in the dot, zero and scale after it) with a
    tile in one group, and the per-weight path with groups smaller than a tile: both to f16 rounding."""
    rng = np.random.default_rng(4)
    for group in (128, 32):
        values, q, scale, zero = random_int4(rng, 512, 64, group)
        x = jnp.asarray(rng.normal(size=(4, 512)), jnp.float16)
        got = int4_matmul(x, q, scale, zero, interpret=True)
        ref64 = exact(x, values, scale, zero)
        assert got.dtype == jnp.float16
        assert np.abs(np.asarray(got, np.float64) - ref64).max() < 2e-3 * np.abs(ref64).max()


def test_kernel_refuses_bad_shapes():
    rng = np.random.default_rng(2)
    _, q, scale, zero = random_int4(rng, 64, 32, 32)
    with pytest.raises(ValueError, match="x has 72 columns but q packs 64 rows"):
        int4_matmul(jnp.zeros((1, 72), jnp.bfloat16), q, scale, zero, interpret=True)
    with pytest.raises(ValueError, match="num_splits=4 does not divide"):
        int4_matmul(jnp.zeros((1, 64), jnp.bfloat16), q, scale, zero, num_splits=4, block_kw=8, interpret=True)
    with pytest.raises(ValueError, match="must both be"):
        int4_matmul(jnp.zeros((1, 64), jnp.bfloat16), q, scale, zero[:1], interpret=True)


@pytest.mark.parametrize("m", [1, 32])
def test_kernel_lowers_for_triton(m):
    """The Pallas Triton lowering takes the kernel at Llama-3-8B's widest shapes (the GPU compiles what
    this emits), and split-K fills the H200's 132 SMs at M=1."""
    for n_in, n_out in ((4096, 28672), (14336, 4096)):
        args = (jax.ShapeDtypeStruct((m, n_in), jnp.bfloat16), jax.ShapeDtypeStruct((n_in // 8, n_out), jnp.int32),
                jax.ShapeDtypeStruct((n_in // 128, n_out), jnp.float16),
                jax.ShapeDtypeStruct((n_in // 128, n_out), jnp.float16))
        text = int4_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        grid = [int(g) for g in re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", text).groups()]
        assert "xla.gpu.triton" in text and grid[0] == n_out // 128 and grid[0] * grid[2] >= 132


def test_pack_round_trip():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 16, (2, 64, 24))
    packed = pack_int4(values)
    assert packed.shape == (2, 8, 24) and packed.dtype == np.int32
    assert (packed[0, 1, 5] >> 28) & 0xF == values[0, 15, 5]  # row 8p + k in bits 4k..4k+3 of word p
    assert np.array_equal(unpack_int4(packed), values)
    assert np.array_equal(np.asarray(unpack_int4(jnp.asarray(packed))), values)
    assert np.array_equal(np.asarray(pack_int4(jnp.asarray(values))), packed)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(values[:, :60])


def test_loader_repacks_awq_words():
    """AWQ's interleaved words [in, out / 8], unpacked by the loader and repacked by int4_layout, hold the
    same values in the kernel's layout."""
    rng = np.random.default_rng(4)
    values = rng.integers(0, 16, (64, 32))
    words = np.zeros((64, 4), np.uint32)
    for k, col in enumerate(AWQ_ORDER):  # nibble k holds column AWQ_ORDER[k] of each eight
        words |= values[:, col::8].astype(np.uint32) << np.uint32(4 * k)
    q = unpack_checkpoint_words(words.view(np.int32), axis=1, order=AWQ_ORDER)
    scale, zero = rng.uniform(0.01, 0.1, (2, 32)).astype(np.float32), rng.integers(0, 16, (2, 32)).astype(np.float32)
    packed = int4_layout(UnpackedLinear(q=q, scale=scale, zero=zero), "layer")
    assert np.array_equal(unpack_int4(packed.q), values) and packed.perm is None
    assert packed.scale.dtype == np.float16 and packed.zero.dtype == np.float16


def test_act_order_sorted_into_groups():
    """GPTQ act-order at load: rows sorted by group (perm kept), so x[:, perm] @ packed == x @ the weight
    g_idx describes; unequal groups are refused."""
    rng = np.random.default_rng(5)
    n_in, n_out, group = 64, 16, 16
    values = rng.integers(0, 16, (n_in, n_out))
    g_idx = rng.permutation(np.arange(n_in) // group).astype(np.int32)
    scale = rng.uniform(0.01, 0.1, (n_in // group, n_out)).astype(np.float16).astype(np.float32)
    zero = rng.integers(0, 16, (n_in // group, n_out)).astype(np.float32)
    packed = int4_layout(UnpackedLinear(q=values, scale=scale, zero=zero, g_idx=g_idx), "layer")
    assert np.array_equal(np.sort(packed.perm), np.arange(n_in))
    assert np.array_equal(g_idx[packed.perm], np.arange(n_in) // group)  # contiguous groups
    w = QuantizedWeight(q=jnp.asarray(packed.q), scale=jnp.asarray(packed.scale), zero=jnp.asarray(packed.zero),
                        perm=jnp.asarray(packed.perm), method="int4")
    want = (values - zero[g_idx]) * scale[g_idx]
    assert np.allclose(np.asarray(dequantize(w, jnp.float32)), want, atol=1e-6)
    x = jnp.asarray(rng.normal(size=(3, n_in)), jnp.float32)
    assert np.allclose(np.asarray(matmul(x, w)), np.asarray(x) @ want, atol=1e-4)
    bad = g_idx.copy()
    bad[0] = (bad[0] + 1) % (n_in // group)
    with pytest.raises(ValueError, match="layer: g_idx gives groups of 15 to 17 rows"):
        int4_layout(UnpackedLinear(q=values, scale=scale, zero=zero, g_idx=bad), "layer")


def test_dispatch(monkeypatch):
    """JAXLLM_INT4_KERNEL: 1 puts quant.matmul on the kernel (the interpreter on a CPU) under lax.scan with
    act-order, giving the XLA path's result; 0 and the CPU default keep XLA's; anything else is refused."""
    rng = np.random.default_rng(6)
    L, n_in, n_out = 2, 128, 32
    w = quantize_array(jnp.asarray(rng.normal(size=(L, n_in, n_out)), jnp.float32), "int4")
    w = QuantizedWeight(q=w.q, scale=w.scale, zero=w.zero, perm=jnp.asarray(
        np.stack([rng.permutation(n_in) for _ in range(L)]).astype(np.int32)), method="int4")
    x = jnp.asarray(rng.normal(size=(5, n_in)), jnp.bfloat16)
    calls = []
    monkeypatch.setattr(quant, "int4_matmul", lambda *a, **k: calls.append(k) or int4_matmul(*a, **k))

    def run():
        return jax.jit(lambda w: jax.lax.scan(lambda c, wl: (c, matmul(x, wl)), 0, w)[1])(w)

    monkeypatch.delenv("JAXLLM_INT4_KERNEL", raising=False)
    xla = run()
    assert not calls and not use_int4_kernel(x, jax.tree.map(lambda a: a[0], w))
    monkeypatch.setenv("JAXLLM_INT4_KERNEL", "1")
    kernel = run()
    assert calls and calls[0]["interpret"] is True
    kernel, xla = np.asarray(kernel, np.float32), np.asarray(xla, np.float32)
    assert np.abs(kernel - xla).max() < 2e-2 * np.abs(xla).max()
    monkeypatch.setenv("JAXLLM_INT4_KERNEL", "0")
    assert not use_int4_kernel(x, jax.tree.map(lambda a: a[0], w))
    monkeypatch.setenv("JAXLLM_INT4_KERNEL", "yes")
    with pytest.raises(ValueError, match="JAXLLM_INT4_KERNEL='yes'"):
        use_int4_kernel(x, jax.tree.map(lambda a: a[0], w))


def test_random_weights_awq():
    """quantize_weights(params, "awq"): int4 groups of 128 with zero points, within a group's step of the
    float weights; methods without a random-weight form are refused by name."""
    from jaxllm.config import ModelConfig
    from jaxllm.models.shapes import init_random_weights

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=128, intermediate_size=256,
                         num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64)
    params = init_random_weights(config, jax.random.PRNGKey(0))
    quantized = quant.quantize_weights(params, "awq")
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        w, f = getattr(quantized.layers, name), np.asarray(getattr(params.layers, name), np.float32)
        assert w.method == "int4" and w.q.dtype == jnp.int32 and w.shape == f.shape
        assert w.scale.shape == (2, f.shape[1] // quant.INT4_GROUP, f.shape[2]) and w.scale.dtype == jnp.float16
        step = np.repeat(np.asarray(w.scale, np.float32), quant.INT4_GROUP, axis=1)
        assert (np.abs(np.asarray(dequantize(w, jnp.float32)) - f) <= 0.51 * step + 1e-6).all()
    with pytest.raises(ValueError, match="quantization='gptq': random weights are quantized in memory with fp8, int8"):
        quant.quantize_weights(params, "gptq")


def test_vllm_peer_awq_config(tmp_path):
    """benchmarks/vllm_peer.py gives vLLM's dummy loader an AutoAWQ GEMM quantization_config for awq."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from vllm_peer import hf_config_folder

    config = json.loads((Path(hf_config_folder("qwen3-0.6b", "bfloat16", "awq")) / "config.json").read_text())
    assert config["quantization_config"] == dict(quant_method="awq", bits=4, group_size=quant.INT4_GROUP,
                                                 zero_point=True, version="gemm")
    assert "quantization_config" not in json.loads(
        (Path(hf_config_folder("qwen3-0.6b", "bfloat16", "fp8")) / "config.json").read_text())


def test_awq_checkpoint_greedy_with_kernel(tmp_path, monkeypatch):
    """An AutoAWQ checkpoint (tests/test_quantization.py writes it) generates the same greedy tokens with
    every int4 matmul on the kernel (interpreted) as with XLA's dequantize path."""
    import torch  # noqa: F401  (test_quantization.py writes checkpoints from torch tensors)
    from hf_models import tiny_hf_model
    from jaxllm.loader import load_model
    from test_model_numerics import PROMPT_LEN, greedy_under_env, random_prompt
    from test_quantization import GROUP, _awq_checkpoint, _write

    model = tiny_hf_model("llama")
    tensors, _ = _awq_checkpoint(model)
    _write(tmp_path, model, tensors, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                      "version": "gemm"})
    config, params = load_model(tmp_path)
    prompt = random_prompt(PROMPT_LEN, seed=1)
    calls = []
    monkeypatch.setattr(quant, "int4_matmul", lambda *a, **k: calls.append(1) or int4_matmul(*a, **k))

    def greedy(mode: str):
        return greedy_under_env(monkeypatch, "JAXLLM_INT4_KERNEL", mode, config, params, prompt, 6)

    xla_tokens, xla_logits = greedy("0")
    assert not calls
    kernel_tokens, kernel_logits = greedy("1")
    assert len(calls) >= 4  # every linear of the layer body (traced once under the scan)
    assert kernel_tokens == xla_tokens
    assert np.abs(kernel_logits - xla_logits).max() < 1e-3 * np.abs(xla_logits).max()
