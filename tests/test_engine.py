"""The engine end to end on a tiny random model: scheduling must never change what greedy decoding produces."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest

from jaxllm import SamplingParams, StructuredOutputsParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_prompts(tokenizer, n, lo, hi, seed=0):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_preemption_gives_the_same_outputs_as_a_large_pool(make_llm, smol_tokenizer):
    prompts = random_prompts(smol_tokenizer, 6, 20, 40)
    # Each request needs up to 64 tokens = 4 blocks; 10 blocks cannot hold 6 requests at once.
    small = make_llm(num_gpu_blocks_override=10, max_model_len=128)
    big = make_llm(num_gpu_blocks_override=256, max_model_len=128)
    out_small = small.generate(prompts, GREEDY, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(out_small) == token_ids(big.generate(prompts, GREEDY, use_tqdm=False))
    assert small.llm_engine.kv_cache_manager.num_free_blocks == 10


def test_chunked_prefill_equals_unchunked(make_llm, smol_tokenizer):
    prompts = random_prompts(smol_tokenizer, 4, 40, 90, seed=1)
    chunked = make_llm(max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False)
    whole = make_llm(max_num_batched_tokens=512, enable_prefix_caching=False)
    assert token_ids(chunked.generate(prompts, GREEDY, use_tqdm=False)) == token_ids(
        whole.generate(prompts, GREEDY, use_tqdm=False))


def test_shared_prefix_is_computed_once(make_llm, smol_tokenizer):
    prefix = random_prompts(smol_tokenizer, 1, 48, 48, seed=2)[0]["prompt_token_ids"]  # 3 full blocks
    tails = random_prompts(smol_tokenizer, 4, 5, 9, seed=3)
    prompts = [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in tails]
    cached = make_llm(max_num_batched_tokens=256)
    kv = cached.llm_engine.kv_cache_manager
    out_cached = cached.generate(prompts, GREEDY, use_tqdm=False)
    # The first request computes the prefix; the other three find its 3 blocks (48 tokens each).
    assert kv.prefix_cache_hits == 3 * 48
    uncached = make_llm(max_num_batched_tokens=256, enable_prefix_caching=False)
    assert token_ids(out_cached) == token_ids(uncached.generate(prompts, GREEDY, use_tqdm=False))
    # A later identical prompt hits again: freed blocks stay findable by hash.
    cached.generate(prompts[:1], GREEDY, use_tqdm=False)
    # Only the 3 prefix blocks: the 4th mixes prompt and generated tokens, so it cannot match a prompt.
    assert kv.prefix_cache_hits == 4 * 48


def test_thirty_varied_prompts_compile_a_handful_of_programs(make_llm, smol_tokenizer):
    from jaxllm.step_programs import model_program

    llm = make_llm(max_num_seqs=16, max_num_batched_tokens=128, num_gpu_blocks_override=256)
    before = model_program._cache_size()
    prompts = random_prompts(smol_tokenizer, 30, 3, 100, seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    compiled = model_program._cache_size() - before
    runner = llm.llm_engine.runner
    assert compiled <= len(runner.compiled_buckets) <= 12, sorted(runner.compiled_buckets)


def test_outputs_come_back_in_input_order_with_finish_reasons(make_llm, smol_tokenizer):
    llm = make_llm()
    outs = llm.generate(["Hello, my name is", "The capital of France is", "1 2 3"],
                        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello, my name is", "The capital of France is", "1 2 3"]
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 5
        assert o.prompt_token_ids == smol_tokenizer(o.prompt).input_ids
        assert o.outputs[0].text == smol_tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_token_ids_end_the_output(make_llm):
    llm = make_llm()
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    stop_at = free.outputs[0].token_ids[2]
    first = free.outputs[0].token_ids.index(stop_at)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.outputs[0].token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_seeded_request_is_the_same_alone_and_in_a_batch(make_llm, smol_tokenizer):
    llm = make_llm(max_num_seqs=16, max_num_batched_tokens=256)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7 + i / 20, top_k=5 + i, max_tokens=6 + i, ignore_eos=True)
              for i in range(15)]
    prompts = [p["prompt_token_ids"] for p in random_prompts(smol_tokenizer, 15, 4, 30, seed=5)]
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts[:7]] + ["Once upon a time"]
                         + [{"prompt_token_ids": p} for p in prompts[7:]], others[:7] + [seeded] + others[7:],
                         use_tqdm=False)
    assert batch[7].outputs[0].token_ids == alone


def test_bad_input_is_refused_before_any_work(make_llm):
    llm = make_llm(max_model_len=64)
    assert llm.generate([], use_tqdm=False) == []
    with pytest.raises(TypeError, match="prompts\\[1\\]"):
        llm.generate(["fine", 42], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.generate(["fine", {"prompt_token_ids": [5] * 64}], use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [-1, 3]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # The engine still works after refusing.
    assert len(llm.generate("fine", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) >= 1


def test_too_small_a_cache_names_the_flag(tiny_model):
    from jaxllm import LLM

    config, params, tok = tiny_model
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM.from_params(params, config, tok, num_gpu_blocks_override=2, max_model_len=256)


def test_kv_cache_room_fits_free_memory_as_it_lies():
    """The cache's room is what the limit leaves after weights and a step's scratch; when freed weights left
    holes, it is what the largest free block holds beside that scratch, never more than the block."""
    from jaxllm.engine import kv_cache_room

    gib = 2**30
    stats = {"bytes_limit": 105 * gib, "bytes_in_use": 8 * gib, "peak_bytes_in_use": 40 * gib}
    room, limit, used, _ = kv_cache_room(stats, 0.9, temp=2 * gib)
    assert (limit, used) == (94.5 * gib, 10 * gib) and room == 84.5 * gib
    assert kv_cache_room(stats, 0.9, temp=None)[0] == 54.5 * gib  # scratch unknown: the peak counts
    # 16 GiB of freed float weights below 8 GiB of FP8 ones: the largest block is the 81 GiB above them
    room = kv_cache_room({**stats, "largest_free_block_bytes": 81 * gib}, 0.9, temp=2 * gib)[0]
    assert room == 79 * gib
    assert kv_cache_room({**stats, "largest_free_block_bytes": 97 * gib}, 0.9, 2 * gib)[0] == 84.5 * gib


def test_kv_cache_room_is_a_share_of_the_device():
    """gpu_memory_utilization is a share of the device's memory, as in vLLM, not of JAX's pool (a fraction of
    the device): 0.9 of a 140 GiB device is 126 GiB in a 95% pool, and the whole pool when it is smaller."""
    from jaxllm.engine import kv_cache_room

    gib = 2**30
    stats = {"bytes_limit": 133 * gib, "bytes_in_use": 90 * gib}
    room, limit, used, _ = kv_cache_room(stats, 0.9, temp=0, pool_fraction=0.95)
    assert limit == 126 * gib and room == 36 * gib
    assert kv_cache_room({**stats, "bytes_limit": 105 * gib}, 0.9, temp=0, pool_fraction=0.75)[1] == 105 * gib


def test_import_sets_the_pool_unless_the_application_did():
    """Importing jaxllm puts JAX's GPU pool at 95% of the device (JAX's default, 75%, is under the default
    gpu_memory_utilization), and leaves a value the application set."""
    code = "import jaxllm, os; from jaxllm.engine import device_pool_fraction; print(device_pool_fraction())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) == 0.95
    out = subprocess.run([sys.executable, "-c", code], env={**env, "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"},
                         capture_output=True, text=True, check=True)
    assert float(out.stdout) == 0.5


def test_random_weights_quantized_come_back_to_the_device():
    """`random_weights(..., "fp8")`: the quantized weights after their trip through the host (which packs
    them in device memory) equal quantizing the float weights in place, and live on the device."""
    import jax

    from jaxllm.config import ModelConfig
    from jaxllm.models.quant import QuantizedWeight, quantize_weights
    from jaxllm.models.shapes import init_random_weights, random_weights

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16)
    key = jax.random.PRNGKey(3)
    got = random_weights(config, key, "fp8")
    want = quantize_weights(init_random_weights(config, key), "fp8")
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    assert any(is_q(v) for v in vars(got.layers).values())
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert isinstance(g, jax.Array) and g.dtype == w.dtype and (g == w).all()


def test_async_scheduling_gives_the_same_outputs_as_sync(make_llm, smol_tokenizer):
    """Step N+1 is launched before step N's tokens are read; outputs, stops included, must not change."""
    prompts = random_prompts(smol_tokenizer, 6, 5, 40, seed=6)
    sync = make_llm(async_scheduling=False, max_num_seqs=4, num_gpu_blocks_override=10, max_model_len=128)
    free = sync.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[free[3]]),  # stops early
              SamplingParams(temperature=0.9, seed=7, max_tokens=18, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=5, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=25, ignore_eos=True, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    want = sync.generate(prompts, params, use_tqdm=False)
    asyn = make_llm(async_scheduling=True, max_num_seqs=4, num_gpu_blocks_override=10, max_model_len=128)
    got = asyn.generate(prompts, params, use_tqdm=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got] == \
        [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in want]
    assert want[0].outputs[0].token_ids == free[:4] and want[0].outputs[0].finish_reason == "stop"
    assert asyn.llm_engine.scheduler.num_preemptions > 0  # 10 blocks for 4 x up to 80 tokens: it had to preempt
    assert asyn.llm_engine.kv_cache_manager.num_free_blocks == 10


def test_sampling_programs_compile_while_the_warm_up_step_sizes_the_cache(make_llm, smol_tokenizer, monkeypatch):
    """The GPU engine's start on a CPU: the sampling programs start compiling before the warm-up step that
    sizes the KV cache (they take logits, not the cache), the warm-up runs on its own model program and on
    one of them, and precompile then adds the model programs: each program is traced once, and generation
    traces nothing and gives the tokens of the lazily-compiled path."""
    from jaxllm import step_programs

    counting = {name: _CountingStep(getattr(step_programs, name)) for name in ("model_program", "sampling_program")}
    for name, counter in counting.items():
        monkeypatch.setattr(step_programs, name, counter)
    llm = make_llm(max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=64)
    runner = _gpu_style(llm)
    runner.start_precompile(num_threads=2)
    runner.run_dummy_step(runner.config.token_buckets[-1], decode_only=False, random_rows=True, prefill_kernel=False)
    num_sampling = 5 * len(runner.config.seq_buckets)
    assert (counting["model_program"].lowered, counting["sampling_program"].lowered) == (1, num_sampling)
    runner.resize_kv_cache(64)
    runner.precompile()
    num_models = sum(key[0] == "forward" for key in runner._executables)
    assert (counting["model_program"].lowered, counting["sampling_program"].lowered) == (1 + num_models, num_sampling)
    prompts = random_prompts(smol_tokenizer, 5, 3, 30, seed=8)
    mix = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=4, max_tokens=6, ignore_eos=True),
           SamplingParams(temperature=0.8, top_p=0.9, top_k=30, seed=6, max_tokens=6, ignore_eos=True)]
    mixes = [mix[0], mix[2], [mix[i % 3] for i in range(len(prompts))]]
    ahead = [llm.generate(prompts, p, use_tqdm=False) for p in mixes]
    assert (counting["model_program"].lowered, counting["sampling_program"].lowered) == (1 + num_models, num_sampling)
    runner._executables.clear()
    lazy = [llm.generate(prompts, p, use_tqdm=False) for p in mixes]
    assert [token_ids(o) for o in ahead] == [token_ids(o) for o in lazy]


def _gpu_style(llm, cache_dir=None):
    """The GPU engine's layout on a CPU: mixed steps sized from their token bucket, one table width, and
    the executable cache at `cache_dir` (the CPU engine keeps it off)."""
    from jaxllm.executable_cache import ExecutableCache

    runner = llm.llm_engine.runner
    runner.mixed_seqs_follow_tokens = True
    runner.block_buckets = runner.block_buckets[-1:]
    runner.executable_cache = ExecutableCache(cache_dir) if cache_dir is not None else None
    return runner


def test_gpu_style_precompile_runs_the_same_tokens_with_no_compile(make_llm, smol_tokenizer):
    """The GPU path on a CPU: every bucket compiled ahead of time in parallel, mixed steps sized from
    their token bucket; generation then compiles nothing and gives the tokens of the lazily-compiled path."""
    from jaxllm import step_programs
    from jaxllm.step_programs import model_program, sampling_program

    llm = make_llm(max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=64)
    runner = _gpu_style(llm)
    runner.precompile(num_threads=2)
    # A model program for each decode and each token bucket, and one without logits for each small decode
    # bucket's greedy steps; for each row bucket (a sequence bucket, whatever a mixed step's S) a random and
    # a random with top-k/top-p/min-p sampling program (both with a token bitmask), a greedy one with a
    # token bitmask, and the two general ones.
    num_shapes = len(runner.config.seq_buckets) + len(runner.config.token_buckets)
    small = [S for S in runner.config.seq_buckets if S <= step_programs.GREEDY_ONLY_MAX_ROWS]
    kinds = [key[0] for key in runner._executables]
    assert small and (kinds.count("forward"), kinds.count("sample")) == (num_shapes + len(small),
                                                                         5 * len(runner.config.seq_buckets))
    assert {key[1] for key in runner._executables if key[0] == "sample"} == set(runner.config.seq_buckets)
    assert sum(not key[-1] for key in runner._executables if key[0] == "forward") == len(small)
    prompts = random_prompts(smol_tokenizer, 5, 3, 30, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=6, ignore_eos=True)
    nucleus = SamplingParams(temperature=0.8, top_p=0.95, top_k=20, min_p=0.01, seed=3, max_tokens=6, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=6, structured_outputs=StructuredOutputsParams(
        regex="[a-z ]{3,40}"))
    sampled_constrained = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=6,
                                         structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    seeded_constrained = SamplingParams(temperature=0.8, seed=9, max_tokens=6,
                                        structured_outputs=StructuredOutputsParams(regex="[a-z ]{3,40}"))
    mixed = [constrained if i % 2 else greedy for i in range(len(prompts))]
    mixes = [greedy, seeded, nucleus, [greedy, seeded, nucleus, seeded, greedy], mixed,
             [sampled_constrained, nucleus, constrained, seeded, greedy],
             [seeded_constrained, constrained, seeded, greedy, seeded_constrained]]
    # On the general programs: penalties, logprobs, allowed_token_ids, more than 8 biases a row.
    penalized = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3,
                               max_tokens=6, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.8, seed=2, logprobs=3, max_tokens=6, ignore_eos=True)
    allowed = SamplingParams(temperature=0, allowed_token_ids=list(range(100, 140)), max_tokens=6, ignore_eos=True)
    biased = SamplingParams(temperature=0, logit_bias={t: -100.0 for t in range(200, 230)}, max_tokens=6,
                            ignore_eos=True)
    mixes += [[penalized, with_logprobs, allowed, biased, greedy], [with_logprobs, constrained, penalized, nucleus,
                                                                    seeded]]
    jitted = (model_program, sampling_program)
    before, buckets = [f._cache_size() for f in jitted], set(runner.compiled_buckets)
    ahead = [llm.generate(prompts, p, use_tqdm=False) for p in mixes]
    runner.wait_for_background_compiles()
    # Nothing compiled on a step's path: steps of the last two mixes ran on the general programs while their
    # own compiled in the background; the mixes again run on those.
    assert [f._cache_size() for f in jitted] == before
    assert runner._background and runner.compiled_buckets - buckets == set(runner._background)
    again = [llm.generate(prompts, p, use_tqdm=False) for p in mixes[-2:]]
    runner._executables.clear()
    lazy = [llm.generate(prompts, p, use_tqdm=False) for p in mixes]
    assert [token_ids(o) for o in ahead] == [token_ids(o) for o in lazy]
    assert [token_ids(o) for o in again] == [token_ids(o) for o in lazy[-2:]]


class _CountingStep:
    """Stands in for a jitted program of jaxllm.step_programs: counts traces (`lower`, from any compile thread),
    delegates everything."""

    def __init__(self, step):
        self.step, self.lowered, self._lock = step, 0, threading.Lock()

    def lower(self, *args, **kwargs):
        with self._lock:
            self.lowered += 1
        return self.step.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)


LEGACY_CPU_RUNTIME = "--xla_cpu_use_thunk_runtime=false"


def test_second_start_loads_step_programs_without_tracing(tmp_path):
    """Two starts, each its own process (as in use): the first compiles every program and stores it in the
    executable cache; the second loads them without tracing any (an unreadable entry aside, which
    is dropped and compiled again) and generates the same tokens. The children run XLA's older CPU
    runtime: jaxlib 0.10.2 cannot run an executable of its thunk runtime loaded back ("Function ... not
    found"). The GPU has no such limit, and the CPU engine does not use the cache."""
    import os
    import subprocess
    import sys

    # JAX's own cache off: its CPU entries do not load back under the older runtime either.
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {LEGACY_CPU_RUNTIME}",
               CACHE_TEST_DIR=str(tmp_path), JAXLLM_COMPILATION_CACHE="")
    for phase in ("store", "load"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_executable_cache_phase"], env=dict(env, CACHE_TEST_PHASE=phase),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, (phase, proc.stdout[-3000:] + proc.stderr[-2000:])


def test_executable_cache_phase(make_llm, smol_tokenizer, monkeypatch):
    """One start of the test above (skipped when run on its own)."""
    import json
    import os
    from pathlib import Path

    from jaxllm import step_programs

    phase, cache_dir = os.environ.get("CACHE_TEST_PHASE"), Path(os.environ.get("CACHE_TEST_DIR", "."))
    if phase is None:
        pytest.skip("one phase of test_second_start_loads_step_programs_without_tracing")
    prompts = random_prompts(smol_tokenizer, 5, 3, 30, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)]
    counting = [_CountingStep(getattr(step_programs, name)) for name in ("model_program", "sampling_program")]
    for name, counter in zip(("model_program", "sampling_program"), counting):
        monkeypatch.setattr(step_programs, name, counter)
    lowered = lambda: sum(c.lowered for c in counting)  # noqa: E731
    if phase == "load":
        sorted(cache_dir.rglob("*.pkl"))[0].write_bytes(b"truncated")
    llm = make_llm(max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=64)
    runner = _gpu_style(llm, cache_dir)
    runner.precompile(num_threads=2)
    num_programs = len(runner._executables)
    assert lowered() == (num_programs if phase == "store" else 1)  # only the unreadable entry again...
    assert len(list(cache_dir.rglob("*.pkl"))) == num_programs  # ...and it is stored again
    got = [token_ids(llm.generate(prompts, p, use_tqdm=False)) for p in params]
    assert lowered() == (num_programs if phase == "store" else 1)  # generation found every program
    if phase == "store":
        (cache_dir / "tokens.json").write_text(json.dumps(got))
    else:
        assert got == json.loads((cache_dir / "tokens.json").read_text())


def test_executable_cache_keeps_the_most_recently_used_versions(tmp_path):
    import os

    from jaxllm.executable_cache import KEEP_VERSIONS, ExecutableCache, version_tag

    old = [tmp_path / f"old{i}" for i in range(KEEP_VERSIONS + 1)]
    for i, d in enumerate(old):  # old0 used last
        d.mkdir()
        (d / "x.pkl").write_bytes(b"x")
        os.utime(d, (1e9 - i * 1000, 1e9 - i * 1000))
    mine = tmp_path / version_tag()
    mine.mkdir()
    os.utime(mine, (1e8, 1e8))  # used long ago, but opened now
    cache = ExecutableCache(tmp_path)
    assert cache.directory == mine
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted([mine.name] + [d.name for d in old[:KEEP_VERSIONS - 1]])


def test_executable_cache_key_follows_what_decides_the_program(tiny_model, monkeypatch):
    import jax
    import numpy as np

    from jaxllm.executable_cache import ExecutableCache

    config = tiny_model[0]
    device = jax.devices()[0]
    arrays = (np.zeros((4, 8), np.float32), {"a": np.zeros(3, np.int32)})
    key = ExecutableCache.key(device, {"config": config, "decode_only": False}, arrays)
    assert key == ExecutableCache.key(device, {"decode_only": False, "config": config}, arrays)
    others = [
        ExecutableCache.key(device, {"config": config, "decode_only": True}, arrays),
        ExecutableCache.key(device, {"config": config.replace(num_layers=3), "decode_only": False}, arrays),
        ExecutableCache.key(device, {"config": config, "decode_only": False},
                            (np.zeros((4, 9), np.float32), {"a": np.zeros(3, np.int32)})),
        ExecutableCache.key(device, {"config": config, "decode_only": False},
                            (np.zeros((4, 8), np.float16), {"a": np.zeros(3, np.int32)})),
    ]
    monkeypatch.setenv("JAXLLM_PREFILL", "triton")
    others.append(ExecutableCache.key(device, {"config": config, "decode_only": False}, arrays))
    assert len({key, *others}) == len(others) + 1


def test_fine_token_buckets_pad_at_most_a_third():
    from jaxllm.config import fine_buckets

    for lo, hi in [(256, 16384), (256, 8192), (256, 1000), (8, 8), (16, 48)]:
        b = fine_buckets(lo, hi)
        assert b[0] == lo and b[-1] == hi and list(b) == sorted(set(b))
        # A step of n tokens in (b[i], b[i+1]] pads to b[i+1] <= 1.5 * b[i]: at most a third is padding.
        assert all(b2 <= 1.5 * b1 for b1, b2 in zip(b, b[1:])), b


@pytest.mark.parametrize("name, value", [("max_num_seqs", 0), ("max_num_seqs", -3), ("max_num_batched_tokens", 0),
                                         ("max_num_batched_tokens", 2.5)])
def test_bad_batch_limits_are_refused_by_name(make_llm, name, value):
    """0 must not silently become the default: it is an error that names the parameter."""
    with pytest.raises(ValueError, match=name):
        make_llm(**{name: value})


def test_random_weights_are_drawn_without_a_float32_copy():
    """`init_random_weights` at a bf16 shape holds no float32 array of a weight's size: the engine sizes its KV
    cache from the device's peak memory, and a float32 draw of Llama-3-8B's stacked gate/up (15 GB) once set
    that peak (26.5 GiB of cache instead of 50.6 on an H100)."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.llama import init_random_weights
    from jaxllm.models.shapes import model_shape_config

    config = model_shape_config("qwen3-0.6b", "bfloat16")
    init = lambda key: init_random_weights(config, key)  # noqa: E731
    largest = max(x.size for x in jax.tree.leaves(jax.eval_shape(init, jax.random.PRNGKey(0))))
    from jax.extend.core import ClosedJaxpr, Jaxpr

    def eqns(jaxpr):  # every equation, those of the jitted body and other sub-programs included
        for eqn in jaxpr.eqns:
            yield eqn
            for p in eqn.params.values():
                if isinstance(p, (ClosedJaxpr, Jaxpr)):
                    yield from eqns(p.jaxpr if isinstance(p, ClosedJaxpr) else p)

    all_eqns = list(eqns(jax.make_jaxpr(init)(jax.random.PRNGKey(0)).jaxpr))
    assert sum(e.primitive.name == "random_bits" for e in all_eqns) == 5  # embed, qkv, o, gate_up, down (tied head)
    f32_sizes = [v.aval.size for e in all_eqns for v in e.outvars if getattr(v.aval, "dtype", None) == jnp.float32]
    assert max(f32_sizes, default=0) < largest // 100


def test_logprobs_counts_share_one_program(make_llm, smol_tokenizer):
    """Requests asking for 0, 1, 5 or 20 top logprobs (up to max_logprobs) run on one sampling program
    width, and each still gets its own count of entries."""
    llm = make_llm(max_num_seqs=4, num_gpu_blocks_override=64, max_logprobs=20)
    runner = llm.llm_engine.runner
    widths = {runner._logprobs_width(n) for n in (0, 1, 5, 20)}
    assert widths == {32} and runner._logprobs_width(-1) == llm.llm_engine.model_config.vocab_size
    prompts = random_prompts(smol_tokenizer, 4, 5, 20, seed=3)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=3, logprobs=n) for n in (0, 1, 5, 20)],
                        use_tqdm=False)
    for out, n in zip(outs, (0, 1, 5, 20)):
        for token, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
            assert token in entry and len(entry) in (n, n + 1)  # the sampled token, and the top n
    sampling = [k for k in runner.compiled_buckets if k[0] == "sample"]
    assert {k[7] for k in sampling} == {32}, sampling
