"""The default model (SmolLM2-135M-Instruct GGUF) against Hugging Face transformers: logprobs (raw
log_softmax of the logits) and beam search.

The transformers model is built from the weights jaxllm loaded (a LlamaForCausalLM with the same
tensors), not by transformers' own GGUF reader: that saves ~18 s of GGUF parsing and keeps this file
under a minute; the GGUF dequantization itself is the loader's to test."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxllm import LLM, BeamSearchParams, SamplingParams
from jaxllm.beam_search import get_beam_search_score

PROMPTS = ["Once upon a time, in a small village,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=128,
               block_size=8)


@pytest.fixture(scope="module")
def hf(llm):
    """transformers' LlamaForCausalLM holding jaxllm's weights of the default model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = llm.llm_engine.model_config
    w = llm.llm_engine.runner.params
    hf_config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=256,
                            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                            tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                            eos_token_id=cfg.eos_token_ids[0])
    model = LlamaForCausalLM(hf_config).float().eval()
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size

    def t(x):
        return torch.from_numpy(np.asarray(x, np.float32).copy())

    state = {"model.embed_tokens.weight": t(w.embed), "model.norm.weight": t(w.final_norm)}
    for i in range(cfg.num_layers):
        L = jax.tree.map(lambda a: np.asarray(a[i]), w.layers)
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": t(L.attn_norm), p + "post_attention_layernorm.weight": t(L.mlp_norm),
                  p + "self_attn.q_proj.weight": t(L.wqkv[:, :q].T),
                  p + "self_attn.k_proj.weight": t(L.wqkv[:, q:q + kv].T),
                  p + "self_attn.v_proj.weight": t(L.wqkv[:, q + kv:].T), p + "self_attn.o_proj.weight": t(L.wo.T),
                  p + "mlp.gate_proj.weight": t(L.w_gate_up[:, :f].T), p + "mlp.up_proj.weight": t(L.w_gate_up[:, f:].T),
                  p + "mlp.down_proj.weight": t(L.w_down.T)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def hf_logprobs(hf, token_ids) -> np.ndarray:
    with torch.no_grad():
        logits = hf(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()  # [len, V]: position p predicts token p + 1


def test_logprobs_match_transformers(llm, hf):
    [out] = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=2),
                         use_tqdm=False)
    c = out.outputs[0]
    tokens = out.prompt_token_ids + c.token_ids
    ref = hf_logprobs(hf, tokens)
    P = len(out.prompt_token_ids)
    for k, (token, position) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[P - 1 + k]
        assert token == int(row.argmax())  # greedy agrees
        for tid, lp in position.items():
            assert lp.logprob == pytest.approx(row[tid], abs=1e-4)
            assert lp.rank == int((row >= row[tid] - 1e-6).sum()) or lp.rank == int((row > row[tid]).sum()) + 1
        assert [t for t, lp in position.items() if lp.rank <= 5] == list(np.argsort(-row)[:5])
    assert c.cumulative_logprob == pytest.approx(sum(ref[P - 1 + k][t] for k, t in enumerate(c.token_ids)), abs=1e-3)
    for p in range(1, P):
        position = out.prompt_logprobs[p]
        token = out.prompt_token_ids[p]
        assert position[token].logprob == pytest.approx(ref[p - 1][token], abs=1e-4)


@pytest.mark.parametrize("beam_width, max_tokens", [(3, 6)])
def test_beam_search_matches_transformers(llm, hf, beam_width, max_tokens):
    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens)
    outputs = llm.beam_search([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outputs):
        input_ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(input_ids, num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                              max_new_tokens=max_tokens, length_penalty=1.0, early_stopping=True,
                              output_scores=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        hf_seqs = [s.tolist() for s in ref.sequences]
        # No beam reaches EOS in max_tokens here, so vLLM's and HF's stopping rules agree.
        assert all(tok.eos_token_id not in s[input_ids.shape[1]:] for s in hf_seqs)
        assert [s.tokens for s in out.sequences] == hf_seqs
        # HF's score is sum_logprobs / new_tokens ** length_penalty.
        np.testing.assert_allclose([s.cum_logprob / max_tokens for s in out.sequences],
                                   ref.sequences_scores.numpy(), atol=1e-3)
        assert all(s.finish_reason == "length" and s.text == tok.decode(s.tokens) for s in out.sequences)


def test_beam_score_leaves_out_final_eos():
    assert get_beam_search_score([1, 2, 3, 9], -6.0, eos_token_id=9, length_penalty=1.0) == -2.0
    assert get_beam_search_score([1, 2, 3, 4], -6.0, eos_token_id=9, length_penalty=0.0) == -6.0
