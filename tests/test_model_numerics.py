"""jaxllm's Llama-family forward against transformers, through the loader and the paged KV cache.

Tiny random checkpoints of each supported architecture are saved by transformers and loaded by
jaxllm, then run through prefill (a prompt that leaves its last block part-full), decode steps,
chunked prefill and a ragged two-sequence batch, with blocks handed out in shuffled order. Every
logit must match HF's float32 forward to 1e-4 relative error. The real SmolLM2 GGUF must continue
prompts greedily token for token as transformers' own load of the same file does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import FAMILY_MODELS, TINY_MODELS, hf_greedy, hf_logits, save_tiny_model, smollm2_hf_model
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.loader import default_model_path, load_model, load_tokenizer
from jaxllm.models.registry import model_module

RTOL = 1e-4
PROMPT_LEN = 13  # not a multiple of the block size: the last block stays part-full
DECODE_STEPS = 10


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@dataclasses.dataclass
class Seq:
    """A sequence's host-side state: all its tokens (fed ones and those still to feed), how many
    already sit in the KV cache, and the blocks that hold them."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int = 0


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _all_logits_step(params, token_ids, positions, cache: KVCache, md: AttentionMetadata, config: ModelConfig):
    model = model_module(config.architecture)
    hidden, cache = model.forward_hidden(params, token_ids, positions, cache, md, config)
    return model.compute_logits(params, hidden, config), cache


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _forward_step(params, token_ids, positions, cache: KVCache, md: AttentionMetadata, config: ModelConfig):
    model = model_module(config.architecture)
    hidden, cache = model.forward_hidden(params, token_ids, positions, cache, md, config)
    return model.compute_logits(params, hidden[md.logits_indices], config), cache


class PagedRunner:
    """Drives the model the way an engine would: a block pool handed out in shuffled order, and
    every step padded to fixed (num_tokens, num_seqs) so that a model compiles once per shape."""

    def __init__(self, config: ModelConfig, params, *, block_size: int, num_blocks: int,
                 max_blocks_per_seq: int, seed: int = 0):
        self.config, self.params = config, params
        self.block_size, self.max_blocks = block_size, max_blocks_per_seq
        self.cache = KVCache.create(config, num_blocks, block_size)
        self.free_blocks = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]

    def add(self, token_ids) -> Seq:
        """A sequence with blocks for all of `token_ids`."""
        num_blocks = -(-len(token_ids) // self.block_size)
        assert num_blocks <= self.max_blocks
        table, self.free_blocks = self.free_blocks[:num_blocks], self.free_blocks[num_blocks:]
        return Seq(list(token_ids), table)

    def batch(self, seqs: list[Seq], num_new: list[int], num_tokens: int, num_seqs: int):
        """Inputs for the next `num_new[i]` tokens of each seq, padded to num_tokens / num_seqs."""
        bs = self.block_size
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slot_mapping = np.full(num_tokens, -1, np.int32)
        block_tables = np.zeros((num_seqs, self.max_blocks), np.int32)
        seq_lens = np.zeros(num_seqs, np.int32)
        query_start_loc = np.zeros(num_seqs + 1, np.int32)
        logits_indices = np.zeros(num_seqs, np.int32)
        t = 0
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                token_ids[t], positions[t] = seq.token_ids[pos], pos
                slot_mapping[t] = seq.block_table[pos // bs] * bs + pos % bs
                t += 1
            block_tables[i, :len(seq.block_table)] = seq.block_table
            seq_lens[i] = seq.num_computed_tokens + n
            query_start_loc[i + 1] = t
            logits_indices[i] = t - 1
        query_start_loc[len(seqs) + 1:] = t
        md = AttentionMetadata(slot_mapping=jnp.asarray(slot_mapping), block_tables=jnp.asarray(block_tables),
                               seq_lens=jnp.asarray(seq_lens), query_start_loc=jnp.asarray(query_start_loc),
                               logits_indices=jnp.asarray(logits_indices))
        return jnp.asarray(token_ids), jnp.asarray(positions), md, query_start_loc

    def step_all_logits(self, seqs, num_new, num_tokens, num_seqs) -> list[np.ndarray]:
        """Feed the tokens; return each seq's logits [num_new[i], vocab] for every fed token."""
        token_ids, positions, md, qsl = self.batch(seqs, num_new, num_tokens, num_seqs)
        logits, self.cache = _all_logits_step(self.params, token_ids, positions, self.cache, md, self.config)
        logits = np.asarray(logits)
        for seq, n in zip(seqs, num_new):
            seq.num_computed_tokens += n
        return [logits[qsl[i]:qsl[i + 1]] for i in range(len(seqs))]

    def step_last_logits(self, seqs, num_new, num_tokens, num_seqs) -> np.ndarray:
        """Feed the tokens; return [len(seqs), vocab] logits of each seq's last token (`forward`)."""
        token_ids, positions, md, _ = self.batch(seqs, num_new, num_tokens, num_seqs)
        logits, self.cache = _forward_step(self.params, token_ids, positions, self.cache, md, self.config)
        for seq, n in zip(seqs, num_new):
            seq.num_computed_tokens += n
        return np.asarray(logits)[:len(seqs)]


# ---------------------------------------------------------------- tiny random models

# One shape for every call on a tiny model (24 tokens, 2 sequences), so each compiles once.
TINY_TOKENS, TINY_SEQS = 24, 2


def tiny_runner(config, params, seed=0) -> PagedRunner:
    return PagedRunner(config, params, block_size=4, num_blocks=32, max_blocks_per_seq=8, seed=seed)


def greedy_under_env(monkeypatch, var: str, mode: str, config, params, prompt, new_tokens: int):
    """A tiny runner's greedy tokens after `prompt` with $var set to `mode` (a switch read when a step is
    traced), and the logits of each step [new_tokens, V]: for A/B tests of a kernel against its fallback."""
    monkeypatch.setenv(var, mode)
    jax.clear_caches()
    runner = tiny_runner(config, params)
    seq = runner.add(prompt + [0] * new_tokens)
    logits = runner.step_last_logits([seq], [len(prompt)], TINY_TOKENS, TINY_SEQS)[0]
    out, all_logits = [], [logits]
    for i in range(new_tokens):
        out.append(int(np.argmax(logits)))
        seq.token_ids[len(prompt) + i] = out[-1]
        if i + 1 < new_tokens:
            logits = runner.step_last_logits([seq], [1], TINY_TOKENS, TINY_SEQS)[0]
            all_logits.append(logits)
    return out, np.stack(all_logits)


def random_prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 300, n)]


@pytest.fixture(scope="module", params=list(TINY_MODELS) + list(FAMILY_MODELS))
def tiny(request, tmp_path_factory):
    """(HF model, jaxllm config, jaxllm weights) of one tiny architecture, via save + load_model.
    The Llama one is saved sharded, so the index file is on this path too."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(request.param, folder, max_shard_size="40KB" if request.param == "llama" else None)
    config, params = load_model(folder)
    assert config.dtype == "float32"
    return hf, config, params


def test_prefill_then_decode(tiny):
    hf, config, params = tiny
    prompt = random_prompt(PROMPT_LEN, seed=1)
    generated = hf_greedy(hf, prompt, DECODE_STEPS)
    ref = hf_logits(hf, prompt + generated)  # [PROMPT_LEN + DECODE_STEPS, vocab]

    runner = tiny_runner(config, params)
    seq = runner.add(prompt + generated)
    [prefill] = runner.step_all_logits([seq], [PROMPT_LEN], TINY_TOKENS, TINY_SEQS)
    assert rel_err(prefill, ref[:PROMPT_LEN]) < RTOL
    assert int(prefill[-1].argmax()) == generated[0]
    for i in range(DECODE_STEPS):
        [step] = runner.step_all_logits([seq], [1], TINY_TOKENS, TINY_SEQS)
        assert rel_err(step[0], ref[PROMPT_LEN + i]) < RTOL, f"decode step {i}"


def test_ragged_batch(tiny):
    """Two prompts of different lengths in one call, then decode steps of both in one call."""
    hf, config, params = tiny
    prompts = [random_prompt(PROMPT_LEN, seed=2), random_prompt(6, seed=3)]
    generated = [hf_greedy(hf, p, 3) for p in prompts]
    refs = [hf_logits(hf, p + g) for p, g in zip(prompts, generated)]

    runner = tiny_runner(config, params, seed=1)
    seqs = [runner.add(p + g) for p, g in zip(prompts, generated)]
    out = runner.step_all_logits(seqs, [len(p) for p in prompts], TINY_TOKENS, TINY_SEQS)
    for logits, prompt, ref in zip(out, prompts, refs):
        assert rel_err(logits, ref[:len(prompt)]) < RTOL
    for i in range(3):
        out = runner.step_all_logits(seqs, [1, 1], TINY_TOKENS, TINY_SEQS)
        for logits, prompt, ref in zip(out, prompts, refs):
            assert rel_err(logits[0], ref[len(prompt) + i]) < RTOL, f"decode step {i}"


def test_chunked_prefill(tiny):
    """A prompt prefilled in two chunks (the second reads the first from the cache), sharing its
    second call with another sequence's whole prompt."""
    hf, config, params = tiny
    long, short = random_prompt(PROMPT_LEN, seed=4), random_prompt(5, seed=5)
    ref_long, ref_short = hf_logits(hf, long), hf_logits(hf, short)

    runner = tiny_runner(config, params, seed=2)
    seq_long, seq_short = runner.add(long), runner.add(short)
    [first] = runner.step_all_logits([seq_long], [6], TINY_TOKENS, TINY_SEQS)
    assert rel_err(first, ref_long[:6]) < RTOL
    rest, whole = runner.step_all_logits([seq_long, seq_short], [PROMPT_LEN - 6, 5], TINY_TOKENS, TINY_SEQS)
    assert rel_err(rest, ref_long[6:]) < RTOL
    assert rel_err(whole, ref_short) < RTOL


# ---------------------------------------------------------------- the real model

SMOLLM2_NEW_TOKENS = 24
SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
SMOLLM2_CHAT = [{"role": "user", "content": "What are the three primary colors?"}]


def test_smollm2_greedy_matches_transformers():
    """Greedy continuations of the default GGUF (dequantized, float32): jaxllm batches all prompts
    through the paged cache; transformers runs each alone. Same tokens, and logits within 1e-4."""
    path = default_model_path()
    config, params = load_model(path)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(text) for text in SMOLLM2_TEXTS]
    prompts.append(list(tokenizer.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]))

    block_size, n = 16, len(prompts)
    max_len = max(map(len, prompts)) + SMOLLM2_NEW_TOKENS
    runner = PagedRunner(config, params, block_size=block_size, num_blocks=n * -(-max_len // block_size) + 4,
                         max_blocks_per_seq=-(-max_len // block_size))
    seqs = [runner.add(p + [0] * SMOLLM2_NEW_TOKENS) for p in prompts]  # blocks for the whole run
    prefill_tokens = -(-sum(map(len, prompts)) // 32) * 32
    logits = [runner.step_last_logits(seqs, [len(p) for p in prompts], prefill_tokens, n)]
    for step in range(1, SMOLLM2_NEW_TOKENS):
        for seq, row in zip(seqs, logits[-1]):
            seq.token_ids[seq.num_computed_tokens] = int(row.argmax())
        logits.append(runner.step_last_logits(seqs, [1] * n, n, n))
    logits = np.stack(logits, axis=1)  # [seq, step, vocab]
    ours = logits.argmax(-1).tolist()

    hf = smollm2_hf_model(path)
    for i, prompt in enumerate(prompts):
        theirs, their_logits = hf_greedy(hf, prompt, SMOLLM2_NEW_TOKENS, return_logits=True)
        assert ours[i] == theirs, (f"prompt {i}: jaxllm {tokenizer.decode(ours[i])!r} "
                                   f"!= transformers {tokenizer.decode(theirs)!r}")
        assert rel_err(logits[i], their_logits) < RTOL, f"prompt {i}"


def test_engine_greedy_matches_transformers(tiny):
    """Greedy generation through the engine (scheduler, paged cache, jitted steps): two prompts batched,
    each continued as transformers continues it alone. One token and one sequence bucket, and a block
    table of one width, so the engine compiles two programs (prefill and decode)."""
    from jaxllm import LLM, SamplingParams

    hf, config, params = tiny
    prompts = [random_prompt(PROMPT_LEN, seed=6), random_prompt(7, seed=7)]
    llm = LLM.from_params(params, config, None, max_model_len=32, block_size=8, max_num_seqs=2,
                          max_num_batched_tokens=32, num_gpu_blocks_override=12, enable_prefix_caching=False,
                          token_buckets=(32,), seq_buckets=(2,))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, 8)


@pytest.mark.parametrize("shape,family", [("mixtral-8x7b", "mixtral"), ("qwen3-30b-a3b", "qwen3_moe")])
def test_moe_benchmark_shapes_at_a_tiny_scale(shape, family, tmp_path):
    """The MoE benchmark shapes (jaxllm/models/shapes.py) with their expert counts and routing, dims
    shrunk: random weights have the layout a checkpoint loads to, and generate through the engine."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    small = dict(num_layers=2, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=300)
    config = model_shape_config(shape, "float32", **small)
    params = init_random_weights(config, jax.random.PRNGKey(0), scale=0.3)
    save_tiny_model(family, tmp_path)
    _, loaded = load_model(tmp_path)
    assert jax.tree.structure(params) == jax.tree.structure(loaded)
    llm = LLM.from_params(params, config, None, max_model_len=32, block_size=8, max_num_seqs=2,
                          max_num_batched_tokens=32, num_gpu_blocks_override=12, token_buckets=(32,), seq_buckets=(2,))
    outs = llm.generate([{"prompt_token_ids": random_prompt(9, seed=s)} for s in (8, 9)],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids  # the routed experts see the context
