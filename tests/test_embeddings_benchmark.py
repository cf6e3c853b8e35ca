"""benchmarks/embeddings.py: the peers' model folder (config, placeholder tokenizer, pooling files), the vLLM
side's command (a dry run, no vLLM needed), sentence-transformers loading the folder, and a short run whose
vLLM column says why it is empty where vLLM is not importable."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import embeddings, encoder_folder  # noqa: E402


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
                               "dtype": "bfloat16", "seed": 0,
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


@pytest.mark.parametrize("shape", ["all-minilm-l6-v2", "bge-base", "bge-m3"])
def test_folder_loads_offline_with_a_tokenizer_of_the_shapes_vocabulary(shape, tmp_path):
    import transformers

    folder = encoder_folder.encoder_folder(shape, "bfloat16", str(tmp_path))
    s = embeddings.ENCODER_SHAPES[shape]
    config = transformers.AutoConfig.from_pretrained(folder)
    # vLLM's BERT and XLM-R models read it; transformers 5 no longer writes it by default
    assert config.position_embedding_type == "absolute" and config.vocab_size == s["vocab_size"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == s["vocab_size"] and max(tokenizer.get_vocab().values()) == s["vocab_size"] - 1
    if s["architecture"] == "XLMRobertaModel":
        assert config.pad_token_id == tokenizer.pad_token_id == 1
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id) == (0, 2, 3)
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.mask_token_id) == ("<s>", "</s>", 250001)
        assert "token_type_ids" not in tokenizer.model_input_names
    else:
        assert config.pad_token_id == tokenizer.pad_token_id == 0
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id) == (101, 102, 100)
        assert tokenizer.cls_token == "[CLS]" and "token_type_ids" in tokenizer.model_input_names
    # the workload's ids all lie in the tokenizer's vocabulary (vLLM checks them against it)
    assert max(max(p) for p in embeddings.workload(64, 16, s["vocab_size"], seed=0)) < len(tokenizer)


TINY_SHAPES = {  # the real families at a few layers of small width: sentence-transformers builds them in seconds
    "tiny-bert": (dict(embeddings.ENCODER_SHAPES["all-minilm-l6-v2"], hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2), "MEAN"),
    "tiny-xlm-r": (dict(embeddings.ENCODER_SHAPES["bge-m3"], hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=2, max_position_embeddings=130), "CLS"),
}


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers is not installed")
@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_sentence_transformers_loads_the_folder_and_pools_as_jaxllm(shape, tmp_path, monkeypatch):
    import torch

    s, pooling = TINY_SHAPES[shape]
    monkeypatch.setitem(embeddings.ENCODER_SHAPES, shape, s)
    monkeypatch.setitem(embeddings.ENCODER_POOLING, shape, pooling)
    st = embeddings.build_sentence_transformer(shape, str(tmp_path))
    assert len(st.tokenizer) == s["vocab_size"]
    ids = torch.tensor(embeddings.workload(3, 16, s["vocab_size"], seed=0))
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in st.tokenizer.model_input_names:
        features["token_type_ids"] = torch.zeros_like(ids)
    with torch.inference_mode():
        out = st.forward(features)
    # CLS pooling takes the first token's state; mean pooling the average over the mask: normalised either way
    hidden = out["token_embeddings"]
    pooled = hidden[:, 0] if pooling == "CLS" else hidden.mean(dim=1)
    expected = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(out["sentence_embedding"], expected)


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


def test_a_run_never_overwrites_a_record_by_default(tmp_path, monkeypatch):
    """write_result's default name, when taken, gets the commit and the time appended: the committed record
    stays as it was; an explicit path is written as given."""
    from benchmarks import throughput

    monkeypatch.setattr(throughput, "RESULTS", str(tmp_path))
    (tmp_path / "embeddings-cpu.json").write_text('{"record": 1}')
    throughput.write_result({"run": 2}, None, "embeddings-cpu.json")
    assert (tmp_path / "embeddings-cpu.json").read_text() == '{"record": 1}'
    others = [p for p in tmp_path.iterdir() if p.name != "embeddings-cpu.json"]
    assert len(others) == 1 and others[0].name.startswith("embeddings-cpu-") and '"run": 2' in others[0].read_text()
    throughput.write_result({"run": 3}, str(tmp_path / "embeddings-cpu.json"), "ignored.json")
    assert '"run": 3' in (tmp_path / "embeddings-cpu.json").read_text()
