"""Tensor and data parallelism on CPU devices: the same greedy tokens as one device, weights and KV
cache truly split, and clear errors for layouts that cannot work.

The multi-device runs happen in one child process with XLA_FLAGS=--xla_force_host_platform_device_count=4
(tests/parallel_child.py): the rest of the suite has imported JAX with one device."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def child_env(num_devices: int, **extra) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
                **extra)


def child_result(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_child(layouts: list[dict], num_devices: int = 4, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "parallel_child.py"), json.dumps(layouts)],
                          env=child_env(num_devices), cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return child_result(proc.stdout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    # Llama: 4 query heads, 2 KV heads (at tp=4 each KV head is replicated on two devices), untied head.
    # Qwen3: q/k norms, tied embeddings. Qwen2: fused QKV bias. One device's tokens are transformers'
    # (test_hf_greedy_is_one_device's), which saves compiling the one-device engine for each model.
    # Phi-3: its own checkpoint names on llama.py's weights. Gemma 2 (sliding windows, soft-caps): a
    # family with no tensor-parallel layout, in data-parallel replicas of one device each. Mistral with a
    # window shorter than the sequences: the window rides into each shard's attention. int8 weights
    # with an FP8 KV cache: data-parallel replicas give one device's quantized tokens.
    layouts = [dict(model="llama"), dict(model="llama", tensor_parallel_size=2),
               dict(model="llama", tensor_parallel_size=4), dict(model="llama", data_parallel_size=2),
               dict(model="qwen3", tensor_parallel_size=4),
               dict(model="qwen2", tensor_parallel_size=2, data_parallel_size=2),
               dict(model="phi3", tensor_parallel_size=2), dict(model="gemma2", data_parallel_size=2),
               dict(model="mistral_window", tensor_parallel_size=2),
               dict(model="llama", quantization="int8", kv_cache_dtype="fp8"),
               dict(model="llama", data_parallel_size=2, quantization="int8", kv_cache_dtype="fp8")]
    result = run_child(layouts)
    assert result["num_devices"] == 4
    return result["runs"]


@functools.cache
def hf_tokens(model: str) -> list[list[int]]:
    from hf_models import hf_greedy, tiny_hf_model
    from parallel_child import MAX_TOKENS, PROMPTS

    hf = tiny_hf_model(model)
    return [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]


def _find(runs, model, tp=1, dp=1, quantization=None):
    return next(r for r in runs if r["model"] == model and r.get("tensor_parallel_size", 1) == tp
                and r.get("data_parallel_size", 1) == dp and r.get("quantization") == quantization)


def test_hf_greedy_is_one_device(runs):
    one = _find(runs, "llama")
    assert one["devices"] == [[0]]
    assert one["tokens"] == hf_tokens("llama")
    assert len({tuple(t) for t in one["tokens"]}) == len(one["tokens"])  # the prompts lead apart


@pytest.mark.parametrize("model,tp,dp", [("llama", 2, 1), ("llama", 4, 1), ("llama", 1, 2), ("qwen3", 4, 1),
                                         ("qwen2", 2, 2), ("phi3", 2, 1), ("gemma2", 1, 2), ("mistral_window", 2, 1)])
def test_parallel_layouts_give_the_same_greedy_tokens_as_one_device(runs, model, tp, dp):
    run = _find(runs, model, tp, dp)
    expected = _find(runs, "llama")["tokens"] if model == "llama" else hf_tokens(model)
    assert run["tokens"] == expected
    if model == "llama":
        one = _find(runs, "llama")
        assert run["sampled"] == one["sampled"]
        assert run["logprobs"] == [pytest.approx(lps, abs=1e-4) for lps in one["logprobs"]]
    # Each replica on its own tp devices, and every replica ran steps.
    assert run["devices"] == [list(range(i * tp, (i + 1) * tp)) for i in range(dp)]
    assert all(steps > 0 for steps in run["steps"])


@pytest.mark.parametrize("model,tp", [("llama", 2), ("llama", 4), ("qwen3", 4), ("qwen2", 2)])
def test_weights_and_cache_are_split_over_the_devices(runs, model, tp):
    run = _find(runs, model, tp, 2 if model == "qwen2" else 1)
    weights = run["weights"]
    split = [".embed", ".layers.wqkv", ".layers.wo", ".layers.w_gate_up", ".layers.w_down"]
    split += [".lm_head"] if model == "llama" else []
    split += [".layers.bqkv"] if model == "qwen2" else []
    replicated = [".final_norm", ".layers.attn_norm", ".layers.mlp_norm"]
    for name in split:
        assert weights[name] == [1 / tp] * tp, name
    for name in replicated:
        assert weights[name] == [1.0] * tp, name
    assert run["kv_cache"][".k"] == [1 / tp] * tp and run["kv_cache"][".v"] == [1 / tp] * tp
    # 2 KV heads: split at tp=2; at tp=4 each device holds one, a copy of the head its query heads read.
    assert run["kv_heads"] == max(2, tp)


def test_the_loader_can_keep_weights_on_the_host(tmp_path):
    """What LLM(path, tensor_parallel_size=N) loads: numpy arrays, so no device ever holds a whole copy
    (each receives its shards from the host); the values are the device load's."""
    import jax
    import numpy as np
    from hf_models import save_tiny_model

    from jaxllm.loader import load_model

    save_tiny_model("qwen2", tmp_path)
    _, on_device = load_model(tmp_path)
    _, on_host = load_model(tmp_path, on_host=True)
    assert all(type(x) is np.ndarray for x in jax.tree_util.tree_leaves(on_host))
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(on_device))
    for a, b in zip(jax.tree_util.tree_leaves(on_host), jax.tree_util.tree_leaves(on_device)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_bad_tensor_parallel_size_is_refused_by_name(tiny_model):
    from jaxllm import LLM
    from jaxllm.config import EngineConfig
    from jaxllm.sharding import check_tensor_parallel

    config, params, tok = tiny_model  # 4 query heads, 2 KV heads, intermediate 128; one CPU device here
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 is more than the 1 CPU device"):
        LLM.from_params(params, config, tok, tensor_parallel_size=2, num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=1 needs 2 devices"):
        LLM.from_params(params, config, tok, data_parallel_size=2, num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the model's num_heads=4"):
        check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match=r"intermediate_size=100"):
        check_tensor_parallel(config.replace(intermediate_size=100, num_heads=8, num_kv_heads=8), 8)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 and the model's num_kv_heads=6"):
        check_tensor_parallel(config.replace(num_heads=12, num_kv_heads=6), 4)
    # Families with no tensor-parallel layout say so by architecture; Phi-3 runs on llama.py's weights.
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: GPT2LMHeadModel has no tensor-parallel layout"):
        check_tensor_parallel(config.replace(architecture="GPT2LMHeadModel"), 2)
    check_tensor_parallel(config.replace(architecture="Phi3ForCausalLM"), 2)
    check_tensor_parallel(config.replace(architecture="GPT2LMHeadModel"), 1)
    for name in ("tensor_parallel_size", "data_parallel_size"):
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match=name):
                EngineConfig(**{name: bad})



def test_data_parallel_replicas_run_quantized_weights_and_an_fp8_cache(runs):
    one, dp = _find(runs, "llama", quantization="int8"), _find(runs, "llama", dp=2, quantization="int8")
    assert dp["tokens"] == one["tokens"] and dp["sampled"] == one["sampled"]
    assert dp["devices"] == [[0], [1]] and all(steps > 0 for steps in dp["steps"])


def test_tensor_parallelism_refuses_quantization_by_name(tiny_model, tmp_path):
    """Quantized weights and an FP8 KV cache have no sharded layout: tensor_parallel_size > 1 with either
    is refused naming both parameters (data-parallel replicas of one device run them: `runs`)."""
    from jaxllm import LLM
    from jaxllm.config import EngineConfig
    from jaxllm.models.quant import quantize_weights
    from jaxllm.sharding import check_quantized_tensor_parallel

    config, params, tok = tiny_model
    for method in ("fp8", "int8", "awq"):  # refused before the (slow) load
        with pytest.raises(ValueError, match=rf"tensor_parallel_size=2 with quantization='{method}'"):
            LLM(str(tmp_path), tensor_parallel_size=2, quantization=method)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 with kv_cache_dtype='fp8'"):
        LLM(str(tmp_path), tensor_parallel_size=2, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e4m3': is not supported with tensor_parallel_size=4"):
        EngineConfig(tensor_parallel_size=4, kv_cache_dtype="fp8_e4m3")
    # A pre-quantized checkpoint brings QuantizedWeight leaves with quantization=None: refused from them.
    quantized = quantize_weights(params, "int8")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 with a quantized checkpoint"):
        check_quantized_tensor_parallel(2, params=quantized)
    check_quantized_tensor_parallel(2, params=params)
    check_quantized_tensor_parallel(1, "int8", "fp8", quantized)


def test_a_pooling_model_refuses_parallel_sizes_by_name(tmp_path):
    from hf_models import VOCAB, save_tiny_model
    from parallel_child import save_word_tokenizer

    from jaxllm import LLM

    save_tiny_model("qwen3", tmp_path)
    save_word_tokenizer(tmp_path, VOCAB)
    for name in ("tensor_parallel_size", "data_parallel_size"):
        with pytest.raises(ValueError, match=rf"{name}=2: pooling models run on one device"):
            LLM(str(tmp_path), convert="embed", **{name: 2})


def test_server_with_tensor_and_data_parallel_flags(tmp_path):
    """`python -m jaxllm.serve -tp 2 -dp 2` on four CPU devices, through the openai client: the
    completions are transformers' greedy ones."""
    import time

    import httpx
    import openai
    from hf_models import VOCAB, save_tiny_model
    from parallel_child import MAX_TOKENS, PROMPTS, save_word_tokenizer

    from jaxllm.loader import load_tokenizer

    save_tiny_model("llama", tmp_path)
    save_word_tokenizer(tmp_path, VOCAB)
    port = free_port()
    env = child_env(4)
    cmd = [sys.executable, "-m", "jaxllm.serve", "--model", str(tmp_path), "--port", str(port), "-tp", "2", "-dp", "2", "--max-model-len", "64", "--num-gpu-blocks-override",
           "16", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        got = client.completions.create(model=str(tmp_path), prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert "jaxllm:num_gpu_blocks" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    choices = sorted(got.choices, key=lambda c: c.index)
    assert [c.finish_reason for c in choices] == ["length"] * len(PROMPTS)
    tokenizer = load_tokenizer(tmp_path)
    # (continuing a prompt, the text starts with the space between words)
    assert [c.text.split() for c in choices] == [tokenizer.decode(t).split() for t in hf_tokens("llama")]


def test_two_processes_with_jax_distributed_give_one_device_tokens():
    """Two processes of two CPU devices each, joined by jax.distributed (gloo collectives) through the
    environment, run one engine with tensor_parallel_size=4 over all four devices: both get
    transformers' greedy tokens, and each holds only its own quarter of the weights and cache."""
    env = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
    layouts = json.dumps([dict(model="llama", tensor_parallel_size=4)])
    procs = [subprocess.Popen([sys.executable, str(HERE / "parallel_child.py"), layouts], cwd=HERE.parent,
                              env=child_env(2, **env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [child_result(out) for out, _ in outs]
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert r["num_devices"] == 4
        run = r["runs"][0]
        assert run["tokens"] == hf_tokens("llama")
        assert run["devices"] == [[0, 1, 2, 3]]
        assert run["weights"][".layers.wqkv"] == [0.25, 0.25] and run["kv_cache"][".k"] == [0.25, 0.25]


def test_distributed_initialize_checks_its_arguments(monkeypatch):
    from jaxllm import distributed

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert distributed.initialize() is False  # one process: nothing to join
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="num_processes is missing: pass it or set JAX_NUM_PROCESSES"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process_id=2: must be in \[0, num_processes=2\)"):
        distributed.initialize(num_processes=2, process_id=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': must be an integer"):
        distributed.initialize(process_id=0)
    with pytest.raises(ValueError, match="coordinator_address='node0': must be host:port"):
        distributed.initialize("node0", num_processes=2, process_id=0)
