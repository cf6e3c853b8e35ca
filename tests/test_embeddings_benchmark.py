"""benchmarks/embeddings.py: the vLLM side's folder and command (a dry run, no vLLM needed), and a short
run whose vLLM column says why it is empty where vLLM is not importable."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import embeddings  # noqa: E402


def test_vllm_dry_run_writes_the_shape_and_pooling_and_passes_the_flags(tmp_path, capfd):
    from jaxllm.pooler import resolve_pooler_config

    python = tmp_path / "vllm-env-python"  # another environment's Python: the peer runs there
    python.symlink_to(sys.executable)
    embeddings.main(["--shapes", "bge-m3", "all-minilm-l6-v2", "--lengths", "16", "512", "--repeats", "3",
                     "--max-num-seqs", "128", "--compare", "vllm", "--dry-run", "--vllm-python", str(python)])
    lines = capfd.readouterr().out.splitlines()
    commands, peers = lines[0::2], [json.loads(line) for line in lines[1::2]]
    assert len(commands) == len(peers) == 2
    for command, peer, shape, model_len, pooling in zip(commands, peers, ("bge-m3", "all-minilm-l6-v2"), (8192, 512),
                                                        ("CLS", "MEAN")):
        argv = command.split()
        assert argv[0] == str(python) and argv[1].endswith("benchmarks/vllm_pooling_peer.py")
        flags = " ".join(argv[2:])
        assert "--lengths 16 512 --num-requests 4096 128 --repeats 3 --dtype bfloat16" in flags
        assert f"--max-model-len {model_len}" in flags and flags.endswith("--max-num-seqs 128")
        folder = Path(argv[argv.index("--model") + 1])
        assert peer["llm"] == {"model": str(folder), "runner": "pooling", "load_format": "dummy",
                               "skip_tokenizer_init": True, "dtype": "bfloat16", "seed": 0,
                               "gpu_memory_utilization": 0.9, "max_model_len": model_len, "max_num_seqs": 128}
        assert peer["rows"] == [{"input_len": 16, "num_requests": 4096}, {"input_len": 512, "num_requests": 128}]
        config = json.loads((folder / "config.json").read_text())
        shape_of = embeddings.ENCODER_SHAPES[shape]
        assert config["architectures"] == [shape_of["architecture"]]
        assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
            shape_of["vocab_size"], shape_of["hidden_size"], shape_of["num_layers"])
        # vLLM reads the pooling from these files as jaxllm does: the same pooling, normalised, on both sides
        resolved = resolve_pooler_config(folder, is_encoder=True, override=None)
        assert (resolved.pooling_type, resolved.normalize) == (pooling, True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is importable here")
def test_short_run_reports_the_median_and_why_vllm_is_missing(tmp_path, capsys):
    out = tmp_path / "result.json"
    embeddings.main(["--shapes", "all-minilm-l6-v2", "--lengths", "16", "--num-requests", "8", "--repeats", "3",
                     "--compare", "vllm", "--output-json", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["repeats"] == 3 and len(row["jaxllm"]["runs_s"]) == 3
    assert row["jaxllm"]["elapsed_s"] == sorted(row["jaxllm"]["runs_s"])[1] and row["jaxllm"]["requests_per_s"] > 0
    assert "not importable" in row["vllm"]["skipped"] and "speedup_vs_vllm" not in row
    assert result["encoder_attention"] == "loop"  # the CPU's default, recorded as the runner resolved it
    assert row["load_average_1m"] >= 0
    assert "vllm skipped" in capsys.readouterr().out
