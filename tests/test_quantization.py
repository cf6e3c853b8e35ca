"""Quantization: the QuantizedWeight matmuls, checkpoints written here in each format's exact on-disk
layout (vLLM's FP8, compressed-tensors FP8, AutoAWQ GEMM, AutoGPTQ v1 with act-order), fp8/int8 at load,
the FP8 KV cache, and the refusals.

Each quantized model is checked against transformers running the *dequantized* weights (what the
format stands for; weight-only formats must match it to float32 rounding, W8A8 FP8 to its activation
rounding), and its greedy tokens against the float model's (the agreement is printed and bounded).
"""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_models import hf_greedy, hf_logits, tiny_hf_model
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache, write_kv
from jaxllm.loader import load_model
from jaxllm.models.quant import QuantizedWeight, dequantize, matmul
from pallas_kernels.int4_matmul import pack_int4
from test_model_numerics import PROMPT_LEN, TINY_SEQS, TINY_TOKENS, random_prompt, rel_err, tiny_runner

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
GROUP = 32  # divides the tiny Llama's 64 hidden and 96 ffn rows
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ---------------------------------------------------------------- the matmul on its own


def test_linear_dispatch_under_scan():
    """Stacked QuantizedWeights sliced by lax.scan: each format's matmul equals x @ dequantized (fp8 up
    to its activation rounding), and act-order (`perm`: q's row i is input row perm[i]) is honoured."""
    rng = np.random.default_rng(0)
    L, n_in, n_out, groups = 2, 64, 24, 4
    x = jnp.asarray(rng.normal(size=(5, n_in)), jnp.float32)
    values = rng.integers(0, 16, (L, n_in, n_out))
    q4 = pack_int4(values)
    perm = np.stack([rng.permutation(n_in) for _ in range(L)]).astype(np.int32)
    scale = rng.uniform(0.01, 0.1, (L, groups, n_out)).astype(np.float32)
    zero = rng.integers(0, 16, (L, groups, n_out)).astype(np.float32)
    int4 = dict(q=jnp.asarray(q4), scale=jnp.asarray(scale, jnp.float16), zero=jnp.asarray(zero, jnp.float16),
                method="int4")
    weights = {
        "int4": QuantizedWeight(**int4),
        "int4_act_order": QuantizedWeight(**int4, perm=jnp.asarray(perm)),
        "int8": QuantizedWeight(q=jnp.asarray(rng.integers(-127, 128, (L, n_in, n_out)).astype(np.int8)),
                                scale=jnp.asarray(scale[:, :1]), method="int8"),
        "fp8": QuantizedWeight(q=jnp.asarray(rng.normal(size=(L, n_out, n_in)).astype(ml_dtypes.float8_e4m3fn)),
                               scale=jnp.asarray(scale[:, :1]), method="fp8"),
    }
    for name, w in weights.items():
        def body(carry, wl):
            return carry, matmul(x, wl)

        _, ys = jax.jit(lambda w: jax.lax.scan(body, 0, w))(w)
        ref = jnp.einsum("ti,lio->lto", x, dequantize(w, jnp.float32))
        assert rel_err(ys, ref) < (0.05 if name == "fp8" else 1e-5), name
    # act-order really puts packed row i (group i // 16) at input row perm[i]
    s16 = np.asarray(jnp.asarray(scale, jnp.float16), np.float32)
    l, i, c = 1, 37, 3
    expect = (values[l, i, c] - zero[l, i // (n_in // groups), c]) * s16[l, i // (n_in // groups), c]
    assert weights["int4_act_order"].shape == (L, n_in, n_out)
    assert np.isclose(np.asarray(dequantize(weights["int4_act_order"], jnp.float32))[l, perm[l, i], c], expect)


# ---------------------------------------------------------------- checkpoints in their on-disk formats


def _float_linears(model) -> dict[str, np.ndarray]:
    """HF name prefix -> float32 weight [out, in] of every linear layer a format quantizes."""
    sd = model.state_dict()
    return {k[: -len(".weight")]: sd[k].numpy() for k in sd if k.endswith(".weight") and
            any(k.endswith(n + ".weight") for n in LINEARS)}


def _write(folder, model, tensors: dict, quantization_config: dict | None) -> None:
    """The model's float state with the linear weights replaced by `tensors` (torch), as safetensors, and
    its config.json with `quantization_config`."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not any(k.endswith(n + ".weight") for n in LINEARS)}
    state.update(tensors)
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    if quantization_config:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


def _dequantized_model(deq: dict[str, np.ndarray], fp8_inputs: str | dict | None = None):
    """transformers' tiny Llama with each linear weight replaced by its dequantized value [out, in]. With
    `fp8_inputs`, each linear's input is also rounded through float8_e4m3fn first (W8A8), by a scale per
    token ("token") or the static per-layer scales of a dict."""
    model = tiny_hf_model("llama")
    modules = dict(model.named_modules())
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, w in deq.items():
            params[name + ".weight"].copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
            if fp8_inputs is not None:
                modules[name].register_forward_pre_hook(
                    lambda _, args, name=name: (_fp8_round(args[0], fp8_inputs if fp8_inputs == "token"
                                                           else fp8_inputs[name]),))
    return model


def _fp8_round(x: torch.Tensor, scale) -> torch.Tensor:
    if scale == "token":
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _fp8_checkpoint(model, per_channel: bool, static_inputs: dict | None):
    """(tensors, dequantized weights): float8_e4m3fn weights [out, in] with float32 weight_scale per tensor
    ([], as vLLM's FP8 checkpoints) or per channel ([out, 1], compressed-tensors' "channel" strategy)."""
    tensors, deq = {}, {}
    for name, w in _float_linears(model).items():
        amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
        scale = np.asarray(amax / 448.0, np.float32)
        q = torch.from_numpy(w / scale).to(torch.float8_e4m3fn)
        tensors[name + ".weight"] = q
        tensors[name + ".weight_scale"] = torch.from_numpy(scale)
        if static_inputs is not None:
            tensors[name + ".input_scale"] = torch.tensor(static_inputs[name], dtype=torch.float32)
        deq[name] = q.float().numpy() * scale
    return tensors, deq


def _input_scales(model, prompt) -> dict[str, float]:
    """A static activation scale per linear layer: its input's absolute maximum on `prompt`, over 448."""
    scales, hooks = {}, []
    modules = dict(model.named_modules())
    for name in _float_linears(model):
        def hook(_, args, name=name):
            scales[name] = max(scales.get(name, 0.0), float(args[0].abs().max()) / 448.0)
        hooks.append(modules[name].register_forward_pre_hook(hook))
    hf_logits(model, prompt)
    for h in hooks:
        h.remove()
    return scales


def _asymmetric_int4(w_in_out: np.ndarray, rows_of_group: list[np.ndarray]):
    """Min/max 4-bit quantization of w [in, out] per group of rows: (q [in, out], scale, zero [groups, out])."""
    n_in, n_out = w_in_out.shape
    q = np.zeros((n_in, n_out), np.int64)
    scale = np.zeros((len(rows_of_group), n_out), np.float32)
    zero = np.zeros((len(rows_of_group), n_out), np.int64)
    for g, rows in enumerate(rows_of_group):
        lo, hi = w_in_out[rows].min(0), w_in_out[rows].max(0)
        s = np.maximum(hi - lo, 1e-5) / 15.0
        s = s.astype(np.float16).astype(np.float32)  # stored as float16
        z = np.clip(np.rint(-lo / s), 0, 15).astype(np.int64)
        q[rows] = np.clip(np.rint(w_in_out[rows] / s) + z, 0, 15)
        scale[g], zero[g] = s, z
    return q, scale, zero


def _pack_words(values: np.ndarray, axis: int, order=range(8)) -> np.ndarray:
    """Pack 4-bit values eight to an int32 along `axis`: nibble k holds element order[k] of its eight."""
    v = np.moveaxis(values, axis, -1)
    v = v.reshape(*v.shape[:-1], -1, 8).astype(np.uint32)
    words = np.zeros(v.shape[:-1], np.uint32)
    for k, j in enumerate(order):
        words |= v[..., j] << np.uint32(4 * k)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def _awq_checkpoint(model):
    """AutoAWQ's GEMM layout: qweight [in, out/8] and qzeros [in/g, out/8] int32 in the interleaved order,
    scales [in/g, out] float16."""
    tensors, deq = {}, {}
    for name, w in _float_linears(model).items():
        wt = w.T  # [in, out]
        groups = [np.arange(g, g + GROUP) for g in range(0, wt.shape[0], GROUP)]
        q, scale, zero = _asymmetric_int4(wt, groups)
        tensors[name + ".qweight"] = torch.from_numpy(_pack_words(q, 1, AWQ_PACK_ORDER))
        tensors[name + ".qzeros"] = torch.from_numpy(_pack_words(zero, 1, AWQ_PACK_ORDER))
        tensors[name + ".scales"] = torch.from_numpy(scale.astype(np.float16))
        deq[name] = ((q - np.repeat(zero, GROUP, 0)) * np.repeat(scale, GROUP, 0)).T
    return tensors, deq


def _gptq_checkpoint(model, seed: int = 0):
    """AutoGPTQ's v1 layout with act-order: qweight [in/8, out] packed along the input axis, qzeros
    [in/g, out/8] holding zero - 1, scales [in/g, out] float16, g_idx [in] from a row permutation shared
    by the layers that share an input (as GPTQ's Hessian order is)."""
    rng = np.random.default_rng(seed)
    tensors, deq, perms = {}, {}, {}
    for name, w in _float_linears(model).items():
        wt = w.T
        n_in = wt.shape[0]
        shared = name.rsplit(".", 1)[0] + (".qkv" if name.endswith(("q_proj", "k_proj", "v_proj")) else
                                          ".gate_up" if name.endswith(("gate_proj", "up_proj")) else name)
        perm = perms.setdefault(shared, rng.permutation(n_in))
        g_idx = np.empty(n_in, np.int32)
        g_idx[perm] = np.arange(n_in) // GROUP
        groups = [np.flatnonzero(g_idx == g) for g in range(n_in // GROUP)]
        q, scale, zero = _asymmetric_int4(wt, groups)
        tensors[name + ".qweight"] = torch.from_numpy(_pack_words(q, 0))
        tensors[name + ".qzeros"] = torch.from_numpy(_pack_words(zero - 1, 1))
        tensors[name + ".scales"] = torch.from_numpy(scale.astype(np.float16))
        tensors[name + ".g_idx"] = torch.from_numpy(g_idx)
        deq[name] = ((q - zero[g_idx]) * scale[g_idx]).T
    return tensors, deq


def _check(folder, reference, quantization=None, tol=1e-4, min_agreement=0.0, kv_cache_dtype="auto"):
    """Load `folder`; its prefill logits against `reference` (transformers) and its greedy picks against the
    float model's, teacher-forced along the float model's own greedy continuation. Returns the agreement."""
    config, params = load_model(folder, quantization=quantization)
    assert any(isinstance(leaf, QuantizedWeight) for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
    float_model = tiny_hf_model("llama")
    prompt = random_prompt(PROMPT_LEN, seed=1)
    tokens = prompt + hf_greedy(float_model, prompt, TINY_TOKENS - PROMPT_LEN)
    runner = tiny_runner(config, params)
    [logits] = runner.step_all_logits([runner.add(tokens)], [len(tokens)], TINY_TOKENS, TINY_SEQS)
    err = rel_err(logits, hf_logits(reference, tokens))
    agreement = float(np.mean(logits[PROMPT_LEN - 1:].argmax(-1) == hf_logits(float_model, tokens)[PROMPT_LEN - 1:].argmax(-1)))
    print(f"{folder.name}: rel err {err:.2e} against the dequantized model, greedy agreement with float {agreement:.0%}")
    assert err < tol
    assert agreement >= min_agreement
    return agreement


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


def test_fp8_vllm_checkpoint_static_activations(llama, tmp_path):
    """vLLM's FP8 format: per-tensor weight scales, static input scales (max over q/k/v and gate/up)."""
    inputs = _input_scales(llama, random_prompt(24, 5))
    tensors, deq = _fp8_checkpoint(llama, per_channel=False, static_inputs=inputs)
    for i in range(llama.config.num_hidden_layers):  # KV-cache scales, as vLLM's FP8 checkpoints carry them
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.25 * (i + 1))
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.5)
    _write(tmp_path, llama, tensors, {"quant_method": "fp8", "activation_scheme": "static"})
    _check(tmp_path, _dequantized_model(deq, fp8_inputs=inputs), tol=1e-3, min_agreement=0.8)
    config, _ = load_model(tmp_path)
    assert config.kv_cache_scales == ((0.25, 0.5), (0.5, 0.5), (0.75, 0.5))


def test_fp8_compressed_tensors_per_channel(llama, tmp_path):
    tensors, deq = _fp8_checkpoint(llama, per_channel=True, static_inputs=None)
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                "symmetric": True, "dynamic": False},
             "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}
    _write(tmp_path, llama, tensors, {"quant_method": "compressed-tensors", "format": "float-quantized",
                                      "config_groups": {"group_0": group}, "ignore": ["lm_head"]})
    _check(tmp_path, _dequantized_model(deq, fp8_inputs="token"), tol=1e-3, min_agreement=0.8)


def test_awq_checkpoint(llama, tmp_path):
    tensors, deq = _awq_checkpoint(llama)
    _write(tmp_path, llama, tensors, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                      "version": "gemm"})
    _check(tmp_path, _dequantized_model(deq), tol=1e-4, min_agreement=0.5)


def test_gptq_act_order_checkpoint(llama, tmp_path):
    tensors, deq = _gptq_checkpoint(llama)
    _write(tmp_path, llama, tensors, {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                                      "sym": False})
    _check(tmp_path, _dequantized_model(deq), tol=1e-4, min_agreement=0.5)


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_at_load(llama, tmp_path, method):
    """A float checkpoint with quantization="fp8" (W8A8) or "int8" (weight-only): per-output-channel scales."""
    _write(tmp_path, llama, {k + ".weight": torch.from_numpy(w) for k, w in _float_linears(llama).items()}, None)
    deq = {}
    for name, w in _float_linears(llama).items():
        amax = np.abs(w).max(axis=1, keepdims=True)  # [out, 1]
        if method == "fp8":
            deq[name] = torch.from_numpy(w / (amax / 448)).to(torch.float8_e4m3fn).float().numpy() * (amax / 448)
        else:
            deq[name] = np.clip(np.rint(w / (amax / 127)), -127, 127) * (amax / 127)
    reference = _dequantized_model(deq, fp8_inputs="token" if method == "fp8" else None)
    _check(tmp_path, reference, quantization=method, tol=1e-3 if method == "fp8" else 1e-4, min_agreement=0.8)


# ---------------------------------------------------------------- FP8 KV cache


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float_llama")
    model = tiny_hf_model("llama")
    _write(folder, model, {k + ".weight": torch.from_numpy(w) for k, w in _float_linears(model).items()}, None)
    return load_model(folder)


def _logits_with_cache(config, params, kv_scales=None, dtype=None):
    """Prefill then three decode steps; every step's logits, through a cache of `dtype`."""
    if kv_scales is not None:
        config = config.replace(kv_cache_scales=((kv_scales[0], kv_scales[1]),) * config.num_layers)
    runner = tiny_runner(config, params)
    runner.cache = KVCache.create(config, runner.cache.num_blocks, runner.block_size, dtype)
    tokens = random_prompt(PROMPT_LEN + 3, seed=2)
    seq = runner.add(tokens)
    [prefill] = runner.step_all_logits([seq], [PROMPT_LEN], TINY_TOKENS, TINY_SEQS)
    steps = [runner.step_all_logits([seq], [1], TINY_TOKENS, TINY_SEQS)[0] for _ in range(3)]
    return np.concatenate([prefill, *steps]), runner.cache


def test_fp8_kv_cache_write():
    """write_kv stores K / k_scale and V / v_scale rounded to E4M3 (saturated at 448) in their slots."""
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4,
                         kv_cache_scales=((0.5, 0.5), (0.125, 4.0)))
    cache = KVCache.create(config, num_blocks=4, block_size=2, dtype=jnp.float8_e4m3fn)
    rng = np.random.default_rng(0)
    k, v = (rng.normal(size=(3, 2, 4)).astype(np.float32) * 30 for _ in range(2))
    slots = jnp.asarray([5, -1, 0])  # the padding token (-1) writes nothing
    cache = write_kv(cache, 1, jnp.asarray(k), jnp.asarray(v), slots)
    stored_k = np.asarray(cache.k[1].reshape(8, 2, 4).astype(jnp.float32))
    stored_v = np.asarray(cache.v[1].reshape(8, 2, 4).astype(jnp.float32))
    fp8 = ml_dtypes.float8_e4m3fn
    for row, slot in ((0, 5), (2, 0)):
        np.testing.assert_array_equal(stored_k[slot], np.clip(k[row] / 0.125, -448, 448).astype(fp8).astype(np.float32))
        np.testing.assert_array_equal(stored_v[slot], (v[row] / 4.0).astype(fp8).astype(np.float32))
    assert not np.any(np.delete(stored_k, [0, 5], axis=0)) and not np.any(np.asarray(cache.k[0].astype(jnp.float32)))


def test_fp8_kv_cache(float_llama):
    """The model over an FP8 cache: close to the float cache with scales 1.0 or other moderate ones (which
    the attention undoes), far off with a scale that saturates E4M3 (so the scales are not ignored)."""
    config, params = float_llama
    fp8 = jnp.float8_e4m3fn
    ref, _ = _logits_with_cache(config, params)
    ones, cache = _logits_with_cache(config, params, dtype=fp8)
    assert cache.k.dtype == fp8 and cache.k_scale.shape == (config.num_layers,)
    err = rel_err(ones, ref)
    print(f"fp8 KV cache: rel err {err:.2e}, top-1 agreement {np.mean(ones.argmax(-1) == ref.argmax(-1)):.0%}")
    assert err < 0.1
    scaled, _ = _logits_with_cache(config, params, kv_scales=(0.1, 3.0), dtype=fp8)
    assert rel_err(scaled, ref) < 2 * err
    saturated, _ = _logits_with_cache(config, params, kv_scales=(1e-4, 1e-4), dtype=fp8)
    assert rel_err(saturated, ref) > 5 * err
    assert KVCache.bytes_per_block(config, 16, fp8) * 4 == KVCache.bytes_per_block(config, 16)  # float32 model


def test_engine_fp8_weights_and_kv_cache(llama, tmp_path):
    """LLM with quantization="fp8" end to end (scheduler, paged cache, jitted steps): greedy tokens equal
    transformers' on the dequantized weights with FP8-rounded inputs; then with kv_cache_dtype="fp8" too,
    its agreement with those tokens and with the float model's is measured."""
    from jaxllm import LLM, SamplingParams

    _write(tmp_path, llama, {k + ".weight": torch.from_numpy(w) for k, w in _float_linears(llama).items()}, None)
    config, params = load_model(tmp_path, quantization="fp8")
    deq = {}
    for name, w in _float_linears(llama).items():
        s = np.abs(w).max(axis=1, keepdims=True) / 448
        deq[name] = torch.from_numpy(w / s).to(torch.float8_e4m3fn).float().numpy() * s
    reference = _dequantized_model(deq, fp8_inputs="token")
    prompts = [random_prompt(PROMPT_LEN, seed=6), random_prompt(7, seed=7)]
    expected = [hf_greedy(reference, p, 8) for p in prompts]
    float_greedy = [hf_greedy(llama, p, 8) for p in prompts]
    tokens = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM.from_params(params, config, None, max_model_len=32, block_size=8, max_num_seqs=2,
                              max_num_batched_tokens=32, num_gpu_blocks_override=12, enable_prefix_caching=False,
                              token_buckets=(32,), seq_buckets=(2,), kv_cache_dtype=kv_cache_dtype)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False),
                            use_tqdm=False)
        tokens[kv_cache_dtype] = [list(o.outputs[0].token_ids) for o in outs]
    assert llm.llm_engine.runner.kv_cache.k.dtype == jnp.float8_e4m3fn
    assert tokens["auto"] == expected

    def agree(a, b):
        return sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))

    print(f"greedy tokens equal (of 16): fp8 weights vs float {agree(tokens['auto'], float_greedy)}, "
          f"fp8 weights + fp8 KV vs fp8 weights {agree(tokens['fp8'], tokens['auto'])}, "
          f"vs float {agree(tokens['fp8'], float_greedy)}")


# ---------------------------------------------------------------- refusals


def test_refusals(llama, tmp_path):
    from jaxllm import LLM

    _write(tmp_path, llama, {k + ".weight": torch.from_numpy(w) for k, w in _float_linears(llama).items()}, None)
    with pytest.raises(ValueError, match=r"quantization 'bitsandbytes' is not supported; supported: fp8, int8"):
        load_model(tmp_path, quantization="bitsandbytes")
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized with it"):
        load_model(tmp_path, quantization="awq")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e5m2' is not supported; supported: auto, fp8"):
        LLM(str(tmp_path), kv_cache_dtype="fp8_e5m2")
    config = json.loads((tmp_path / "config.json").read_text())
    for qc, message in [({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
                        ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bits=8 are not supported"),
                        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise scales")]:
        (tmp_path / "config.json").write_text(json.dumps(dict(config, quantization_config=qc)))
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "awq"})))
    with pytest.raises(ValueError, match="quantization='fp8' does not match the checkpoint's quant_method 'awq'"):
        load_model(tmp_path, quantization="fp8")


def test_server_flags():
    from jaxllm.entrypoints.openai_server import make_arg_parser

    args = make_arg_parser().parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8"])
    assert (args.quantization, args.kv_cache_dtype) == ("fp8", "fp8")
    for flags, message in ((["-q", "bitsandbytes"], "invalid choice: 'bitsandbytes'"),
                           (["--kv-cache-dtype", "int8"], "invalid choice: 'int8'")):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            make_arg_parser().parse_args(flags)
        assert message in err.getvalue() and "fp8" in err.getvalue()


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_quantize_random_weights(architecture):
    """Random-weight benchmark models (`--model-shape ... --quantization fp8`): the stacked linear weights of
    a dataclass (Llama) or dict (Mixtral) pytree become QuantizedWeights that stand for the float ones;
    Mixtral's router and experts stay float."""
    from jaxllm.models.quant import LINEAR_FIELDS, quantize_weights
    from jaxllm.models.shapes import init_random_weights

    config = ModelConfig(architecture=architecture, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=2, num_kv_heads=2, head_dim=16,
                         **(dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
                            if "Mixtral" in architecture else {}))
    params = init_random_weights(config, jax.random.PRNGKey(0))
    for method, tol in (("fp8", 0.05), ("int8", 0.01)):
        quantized = quantize_weights(params, method)
        layers = quantized["layers"] if isinstance(quantized, dict) else vars(quantized.layers)
        floats = params["layers"] if isinstance(params, dict) else vars(params.layers)
        names = [k for k, v in layers.items() if isinstance(v, QuantizedWeight)]
        assert names and set(names) <= set(LINEAR_FIELDS) and "router" not in names
        for k in names:
            assert layers[k].method == method and rel_err(dequantize(layers[k], jnp.float32), floats[k]) < tol


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2", "phi3", "falcon_mq", "mpt", "qwen2_moe"])
def test_int8_every_family(family, tmp_path):
    """Each family's matmuls go through layers.linear: int8 weight-only at load stays within 3% of
    transformers' float logits (Conv1D weights, fused qkv/gate_up, biases, MoE shared experts)."""
    from hf_models import save_tiny_model

    hf = save_tiny_model(family, tmp_path)
    config, params = load_model(tmp_path, quantization="int8")
    assert any(isinstance(leaf, QuantizedWeight) for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
    prompt = random_prompt(PROMPT_LEN, seed=1)
    runner = tiny_runner(config, params)
    [logits] = runner.step_all_logits([runner.add(prompt)], [PROMPT_LEN], TINY_TOKENS, TINY_SEQS)
    assert rel_err(logits, hf_logits(hf, prompt)) < 0.03
