"""Run by tests/test_parallel.py in a child process with several CPU devices (the rest of the suite runs
with one): builds tiny random HF checkpoints, generates greedily at each parallel layout and prints
one JSON object of what it saw. Not a test module itself (no test_ prefix)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

PROMPTS = [[3 + i, 17, 41 + 7 * i, 9, 250 - i] for i in range(3)]
MAX_TOKENS = 6

sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]  # this checkout's jaxllm


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("w0" ... "w{vocab_size - 1}") beside a tiny checkpoint, so that the engine
    loads it the way a user's does (a tokenizer from a GGUF takes seconds to build)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(folder)


def shard_fractions(tree) -> dict[str, list[float]]:
    """Per array leaf: the fraction of its elements that each of its devices holds."""
    import jax

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        out[jax.tree_util.keystr(path)] = [s.data.size / x.size for s in x.addressable_shards]
    return out


def main(layouts: list[dict]) -> dict:
    import jax

    import jaxllm.distributed

    jaxllm.distributed.initialize()  # a multi-process run when JAX_COORDINATOR_ADDRESS is set

    from hf_models import VOCAB, save_tiny_model
    from jaxllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    result = {"num_devices": jax.device_count(), "process_index": jax.process_index(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            folder = Path(tmp) / layout["model"]
            if not folder.exists():
                save_tiny_model(layout["model"], folder)
                save_word_tokenizer(folder, VOCAB)
            kwargs = {k: v for k, v in layout.items() if k != "model"}
            # Through the path, as a user loads: weights to the host, then each device's shards to it.
            llm = LLM(str(folder), max_model_len=64, num_gpu_blocks_override=16, max_num_seqs=4,
                      max_num_batched_tokens=16, **kwargs)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            # Seeded random sampling with penalties, a fork (n=2) and logprobs: the sampler on
            # vocabulary-split logits draws what one device draws.
            sampled = llm.generate(prompts[:2], [
                SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5,
                               logprobs=2, ignore_eos=True),
                SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=20, seed=4, repetition_penalty=1.3,
                               n=2, ignore_eos=True)], use_tqdm=False)
            engine = llm.llm_engine
            engines = getattr(engine, "engines", [engine])
            result["runs"].append({
                **layout,
                "tokens": [o.outputs[0].token_ids for o in outputs],
                "sampled": [[c.token_ids for c in o.outputs] for o in sampled],
                "logprobs": [[lp.logprob for lp in step.values()] for step in sampled[0].outputs[0].logprobs],
                "steps": [e.step_times.steps for e in engines],
                "devices": [sorted(jax.devices().index(d) for d in e.runner.kv_cache.k.devices()) for e in engines],
                "weights": shard_fractions(engines[0].runner.params),
                "kv_cache": shard_fractions(engines[0].runner.kv_cache),
                "kv_heads": engines[0].runner.kv_cache.k.shape[3],
            })
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
