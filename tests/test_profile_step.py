"""benchmarks/profile_step.py: `engine` builds its engine from throughput.py's flags and profiles a few steps
of a tiny shape end to end on the CPU (the trace has no GPU plane there, but is written and read back)."""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import profile_step  # noqa: E402
import throughput  # noqa: E402

TINY = json.dumps(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=32))


def test_engine_args_are_throughputs_defaults_with_our_shape_then_its_flags():
    class Ours:
        model_shape, max_model_len = "qwen3-0.6b", 64

    args = profile_step.engine_args(Ours, ["--max-num-seqs", "2", "--kv-cache-dtype", "fp8"])
    defaults = vars(throughput.arg_parser().parse_args([]))
    assert set(vars(args)) == set(defaults)  # every field build_llm may read, whatever throughput.py adds
    assert (args.model_shape, args.max_model_len, args.max_num_batched_tokens) == ("qwen3-0.6b", 64, 8192)
    assert (args.max_num_seqs, args.kv_cache_dtype) == (2, "fp8")  # throughput.py's flags come last and win
    assert (args.dtype, args.quantization, args.structured_outputs) == ("auto", None, "off")


def test_engine_profiles_a_tiny_shape_end_to_end(tmp_path, capsys):
    profile_step.main(["engine", "--model-shape", "qwen3-0.6b", "--num-prompts", "2", "--input-len", "8",
                       "--output-len", "4", "--max-model-len", "64", "--start-step", "1", "--profiled", "2",
                       "--out", str(tmp_path), "--shape-overrides", TINY, "--max-num-seqs", "2",
                       "--max-num-batched-tokens", "64"])
    out = capsys.readouterr().out
    assert "profiled steps 1..2 with 2 running requests" in out
    assert glob.glob(str(tmp_path / "engine-qwen3-0.6b" / "**" / "*.xplane.pb"), recursive=True)
