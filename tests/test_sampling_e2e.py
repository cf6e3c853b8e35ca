"""SamplingParams end to end on a tiny random Llama with the default model's tokenizer (one engine for
the module). The random logits are small (|logit| ~ 0.05), so a logit_bias of a few units decides
greedy choices exactly, which makes penalties and bans checkable by hand."""

from __future__ import annotations

import jax
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import ModelConfig
from jaxllm.models.llama import init_random_weights

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def llm(smol_tokenizer):
    tok = smol_tokenizer
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                      eos_token_ids=(tok.eos_token_id,), tie_word_embeddings=True)
    params = init_random_weights(cfg, jax.random.PRNGKey(0), scale=0.005)
    return LLM.from_params(params, cfg, tok, num_gpu_blocks_override=256, max_num_seqs=32, max_num_batched_tokens=64,
                           max_model_len=128, block_size=BLOCK_SIZE)


def gen(llm, prompt, **kwargs):
    [out] = llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)
    return out


def ids(llm, text):
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


PROMPT = "The quick brown fox jumps over"


SEEDED = dict(temperature=1.0, seed=7, max_tokens=10)  # near-uniform logits: greedy would just repeat a token


@pytest.fixture(scope="module")
def greedy(llm):
    """A seeded continuation (10 tokens) and its text after each token."""
    out = gen(llm, PROMPT, **SEEDED).outputs[0]
    tok = llm.get_tokenizer()
    texts = [tok.decode(out.token_ids[:k]) for k in range(11)]
    assert texts[-1] == out.text
    return out.token_ids, texts


# ---- stops -------------------------------------------------------------------------------------


def test_stop_string_spanning_two_tokens(llm, greedy):
    token_ids, texts = greedy
    t2, t3 = texts[2], texts[3]
    assert len(t3) > len(t2) + 1
    stop = t3[len(t2) - 2:len(t2) + 2]  # the last 2 characters of token 2 and the first 2 of token 3
    assert texts[-1].find(stop) == len(t2) - 2
    c = gen(llm, PROMPT, **SEEDED, stop=["never there", stop]).outputs[0]
    assert c.token_ids == token_ids[:3]
    assert c.text == t2[:-2]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    c = gen(llm, PROMPT, **SEEDED, stop=stop, include_stop_str_in_output=True).outputs[0]
    assert c.text == t2 + t3[len(t2):len(t2) + 2]
    assert c.token_ids == token_ids[:3]


def test_stop_at_the_first_token(llm, greedy):
    token_ids, texts = greedy
    c = gen(llm, PROMPT, **SEEDED, stop=[texts[1]]).outputs[0]
    assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (token_ids[:1], "", "stop", texts[1])


def test_stop_token_ids(llm, greedy):
    token_ids, texts = greedy
    stop_id = token_ids[2]
    assert stop_id not in token_ids[:2]
    c = gen(llm, PROMPT, **SEEDED, stop_token_ids=[stop_id]).outputs[0]
    assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (token_ids[:3], texts[2], "stop", stop_id)
    c = gen(llm, PROMPT, **SEEDED, stop_token_ids=[stop_id], include_stop_str_in_output=True).outputs[0]
    assert c.text == texts[3]


def test_max_tokens_and_detokenize(llm, greedy):
    token_ids, texts = greedy
    c = gen(llm, PROMPT, **SEEDED | {'max_tokens': 4}).outputs[0]
    assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (token_ids[:4], texts[4], "length", None)
    c = gen(llm, PROMPT, **SEEDED | {'max_tokens': 4}, detokenize=False).outputs[0]
    assert (c.token_ids, c.text) == (token_ids[:4], "")


def test_min_tokens_holds_eos_back(llm):
    eos = llm.get_tokenizer().eos_token_id
    c = gen(llm, PROMPT, temperature=0, max_tokens=8, logit_bias={eos: 5.0}).outputs[0]
    assert (c.token_ids, c.finish_reason) == ([eos], "stop")
    c = gen(llm, PROMPT, temperature=0, max_tokens=8, logit_bias={eos: 5.0}, min_tokens=3).outputs[0]
    assert len(c.token_ids) == 4 and eos not in c.token_ids[:3] and c.token_ids[3] == eos
    assert c.finish_reason == "stop"
    c = gen(llm, PROMPT, temperature=0, max_tokens=5, logit_bias={eos: 5.0}, ignore_eos=True).outputs[0]
    assert (c.token_ids, c.finish_reason) == ([eos] * 5, "length")


def test_bad_words_never_appear(llm):
    word = " foobar"
    first, second = ids(llm, word)  # a two-token word, also two tokens without the space (so vLLM bans both)
    # The bias makes `first` then `second` the greedy choice (frequency penalty demotes `first`).
    strong = dict(temperature=0, max_tokens=8, logit_bias={first: 6.0, second: 5.0}, frequency_penalty=2.0)
    c = gen(llm, PROMPT, **strong).outputs[0]
    assert c.token_ids[:2] == [first, second] and word in c.text
    c = gen(llm, PROMPT, bad_words=[word.strip()], **strong).outputs[0]
    assert all((a, b) != (first, second) for a, b in zip(c.token_ids, c.token_ids[1:]))
    assert c.token_ids[:3] == [first] * 3 and word not in c.text and "refractory" not in c.text
    # A one-token bad word is banned everywhere.
    [single] = ids(llm, " the")
    c = gen(llm, PROMPT, temperature=0, max_tokens=6, logit_bias={single: 9.0}, bad_words=["the"]).outputs[0]
    assert single not in c.token_ids


# ---- logit processors end to end ----------------------------------------------------------------


def test_penalties_by_hand(llm):
    a, b, c = ids(llm, " apple")[0], ids(llm, " banana")[0], ids(llm, " cherry")[0]
    out = gen(llm, PROMPT, temperature=0, max_tokens=6, logit_bias={a: 8.0, b: 5.0, c: 2.5}, frequency_penalty=2.0)
    # A 8 | A 6 | B 5 > A 4 | A 4 > B 3 | B 3 > A 2 | C 2.5 > A 2 > B 1
    assert out.outputs[0].token_ids == [a, a, b, a, b, c]
    out = gen(llm, PROMPT, temperature=0, max_tokens=4, logit_bias={a: 3.0, b: 2.2, c: 1.0}, presence_penalty=1.5)
    assert out.outputs[0].token_ids == [a, b, a, a]  # A 3 | B 2.2 > A 1.5 | A 1.5 > C 1 > B .7 | A
    # Repetition: `a` is in the prompt, so from the start a: 4 / 2 < b: 3; then b: 1.5 < a: 2.
    out = gen(llm, PROMPT + " apple", temperature=0, max_tokens=4, logit_bias={a: 4.0, b: 3.0}, repetition_penalty=2.0)
    assert out.outputs[0].token_ids == [b, a, a, a]


def test_allowed_token_ids_and_logit_bias(llm):
    allowed = ids(llm, " one two three")
    out = gen(llm, PROMPT, temperature=1.0, seed=0, max_tokens=6, allowed_token_ids=allowed)
    assert set(out.outputs[0].token_ids) <= set(allowed)


# ---- seeds, n, best_of ----------------------------------------------------------------------------


def test_seeded_request_is_independent_of_the_batch(llm):
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=8)
    [alone] = llm.generate(["Once upon a time"], target, use_tqdm=False)
    prompts = [f"Prompt number {i} says" for i in range(15)] + ["Once upon a time"]
    # Same max_tokens for all, so the batch stays 16 wide (fewer programs to compile).
    others = [SamplingParams(temperature=0.5 + i / 10, top_k=i, max_tokens=8, presence_penalty=i / 10,
                             seed=None if i % 2 else i) for i in range(15)]
    batch = llm.generate(prompts, others + [target], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    assert len(set(tuple(o.outputs[0].token_ids) for o in batch)) > 10  # the others did sample differently


def test_n_shares_prompt_blocks(llm):
    engine = llm.llm_engine
    kv = engine.kv_cache_manager
    prompt = list(range(1000, 1010))  # 10 tokens: 2 full blocks and a partial one
    engine.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6))
    sample_ids = ["n4", "1_n4", "2_n4", "3_n4"]
    engine.step()  # the prompt is computed once; its 3 siblings fork from it when its result is read,
    while not kv.get_block_ids("1_n4"):  # which with async scheduling is during the next step
        engine.step()
    tables = [kv.get_block_ids(r) for r in sample_ids]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 3
    assert [kv.block_pool.blocks[b].ref_count for b in tables[0]] == [4, 4, 4]
    engine.step()  # each sample writes into the partial block: all but the last writer copy it
    tables = [kv.get_block_ids(r) for r in sample_ids]
    assert [kv.block_pool.blocks[b].ref_count for b in tables[0][:2]] == [4, 4]
    assert len({t[2] for t in tables}) == 4
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1]
    assert final.finished and final.request_id == "n4"
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) == 4
    assert all(kv.block_pool.blocks[b].ref_count == 0 for b in tables[0])


def test_best_of_returns_the_highest_cumulative_logprob(llm):
    kwargs = dict(temperature=1.0, seed=11, max_tokens=5, logprobs=0)  # cumulative_logprob needs logprobs
    four = gen(llm, PROMPT, n=4, **kwargs).outputs
    best = gen(llm, PROMPT, n=2, best_of=4, **kwargs).outputs
    ranked = sorted(four, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob


def test_n_seeded_samples_are_reproducible(llm):
    kwargs = dict(n=3, temperature=1.0, seed=21, max_tokens=5)
    assert [c.token_ids for c in gen(llm, PROMPT, **kwargs).outputs] == \
        [c.token_ids for c in gen(llm, PROMPT, **kwargs).outputs]


# ---- logprobs -------------------------------------------------------------------------------------


def test_logprobs_format(llm):
    out = gen(llm, PROMPT, temperature=1.0, seed=3, max_tokens=5, logprobs=3, prompt_logprobs=2)
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    total = 0.0
    for token, position in zip(c.token_ids, c.logprobs):
        assert next(iter(position)) == token  # the chosen token comes first
        assert len(position) in (3, 4)
        ranks = sorted(lp.rank for t, lp in position.items() if t != token or lp.rank <= 3)
        assert ranks[:3] == [1, 2, 3]
        lps = [lp.logprob for lp in position.values()]
        assert all(x <= 0 for x in lps)
        assert position[token].decoded_token == llm.get_tokenizer().decode([token])
        total += position[token].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    prompt_ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for token, position in zip(prompt_ids[1:], out.prompt_logprobs[1:]):
        assert next(iter(position)) == token and len(position) in (2, 3)


def test_logprobs_above_engine_max_raise(llm):
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([PROMPT], SamplingParams(logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([PROMPT], SamplingParams(prompt_logprobs=50), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([PROMPT], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
