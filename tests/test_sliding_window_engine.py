"""The engine on a tiny random Mistral whose window (6) is much shorter than its sequences: the blocks that
leave the window go back to the pool, and greedy tokens stay transformers' own."""

from __future__ import annotations

import dataclasses

import pytest

from hf_models import hf_greedy, save_tiny_model
from jaxllm import LLM, SamplingParams
from jaxllm.core.block_pool import NULL_BLOCK_ID
from jaxllm.loader import load_model

WINDOW, BLOCK = 6, 4
NEW_TOKENS = 24
# A query's window spans 2 blocks at most, its own included, so a decoding request holds at most 3.
DECODE_BLOCKS = -(-WINDOW // BLOCK) + 1


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_window")
    hf = save_tiny_model("mistral_window", folder)
    config, params = load_model(folder)
    assert config.all_layers_window == WINDOW
    return hf, config, params


def make_llm(config, params, **kwargs) -> LLM:
    kwargs = dict(dict(max_model_len=64, block_size=BLOCK, max_num_seqs=2, max_num_batched_tokens=16,
                       num_gpu_blocks_override=16, token_buckets=(16,), seq_buckets=(2,)), **kwargs)
    return LLM.from_params(params, config, None, **kwargs)


def test_blocks_leave_the_window_and_greedy_tokens_match_transformers(mistral):
    hf, config, params = mistral
    prompts = [[(7 * i + 3) % 297 + 3 for i in range(21)], [(11 * i + 5) % 297 + 3 for i in range(18)]]
    llm = make_llm(config, params)
    engine = llm.llm_engine
    kv = engine.kv_cache_manager
    assert kv.sliding_window == WINDOW and kv.num_free_blocks == 15  # one block is the null block
    # Poison the null block: a query that read a freed position inside its window would see it.
    cache = engine.runner.kv_cache
    engine.runner.kv_cache = dataclasses.replace(cache, k=cache.k.at[:, NULL_BLOCK_ID].set(1e4),
                                                 v=cache.v.at[:, NULL_BLOCK_ID].set(1e4))
    params_greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params_greedy)
    outputs, held_in_decode = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        running = engine.scheduler.running
        if running and all(r.num_computed_tokens > r.num_prompt_tokens for r in running):
            held_in_decode.append(15 - kv.num_free_blocks)
    # 45 and 42 positions would need 12 and 11 blocks; with the window, both decode in 2 * 3 blocks.
    assert engine.scheduler.num_preemptions == 0
    assert held_in_decode and max(held_in_decode) <= 2 * DECODE_BLOCKS
    assert kv.num_free_blocks == 15 and kv.usage == 0.0
    for i, p in enumerate(prompts):
        assert outputs[str(i)] == hf_greedy(hf, p, NEW_TOKENS), f"prompt {i}"


def test_a_window_no_query_exceeds_is_dropped(mistral):
    """max_model_len within the window: full attention is the same computation (and long prefill chunks
    can take the Mosaic kernel), and there is nothing to free."""
    _, config, params = mistral
    engine = make_llm(config, params, max_model_len=WINDOW, max_num_batched_tokens=8, token_buckets=(8,),
                      num_gpu_blocks_override=8).llm_engine
    assert engine.model_config.sliding_window is None
    assert engine.kv_cache_manager.sliding_window is None and engine.kv_cache_manager.num_free_blocks == 8


def test_preemption_and_abort_under_a_window_leak_nothing(mistral):
    """A pool of 5 usable blocks, the least a sequence may need with chunks of 8 (positions back to the
    window's start, 13 in all, span up to 5 blocks), and two decoding requests needing up to 3 each: they
    preempt each other and are recomputed (from prefix-cache hits, dead ones not taken); an abort
    mid-decode frees the rest."""
    hf, config, params = mistral
    prompts = [[(5 * i + 1) % 297 + 3 for i in range(19)], [(13 * i + 2) % 297 + 3 for i in range(23)]]
    llm = make_llm(config, params, num_gpu_blocks_override=6, max_num_batched_tokens=8, token_buckets=(8,))
    engine = llm.llm_engine
    params_greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts + [prompts[0][:9]]):
        engine.add_request(str(i), {"prompt_token_ids": p}, params_greedy)
    outputs, aborted = {}, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        third = engine.requests.get("2")
        if not aborted and third is not None and third.num_output_tokens >= 2:
            engine.abort_request("2")
            aborted = True
    assert engine.scheduler.num_preemptions > 0 and aborted
    assert engine.kv_cache_manager.num_free_blocks == 5 and not engine.kv_cache_manager.req_to_blocks
    for i, p in enumerate(prompts):
        assert outputs[str(i)] == hf_greedy(hf, p, 16), f"prompt {i}"
