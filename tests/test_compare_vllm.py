"""benchmarks/compare_vllm.py: the table it writes, the commands it runs (no engine is started), and the EOS
that throughput.py's rows with a tokenizer stop at (a tiny engine is built, nothing runs)."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_vllm  # noqa: E402
import throughput  # noqa: E402


def test_table_has_the_vllm_column_and_the_ratio_range():
    rows = {"top-p": {"jaxllm": [{"jaxllm": {"output_tokens_per_s": 15920.0}}, {"jaxllm": {"output_tokens_per_s": 16100.0}}],
                      "vllm": [{"vllm": {"output_tokens_per_s": 19821.0}}, {"vllm": {"output_tokens_per_s": 19530.0}}]},
            "single-qwen": {"jaxllm": [{"jaxllm": {"output_tokens_per_s": 600.0}}], "vllm": [{"error": "boom"}]}}
    lines = compare_vllm.markdown(rows, "0.26.0").splitlines()
    assert lines[0] == "| workload | vLLM 0.26.0 | jaxllm | jaxllm / vLLM |"
    assert lines[2].endswith("| 19,821 / 19,530 | 15,920 / 16,100 | 0.80-0.82 |")  # 15920/19821 .. 16100/19530
    assert lines[3].endswith("| - | 600 |  |")  # a failed vLLM run leaves its cell empty, no ratio
    assert "not run" in compare_vllm.markdown(rows, None).splitlines()[0]


def test_both_engines_get_the_same_flags_alternated(capsys):
    compare_vllm.main(["--rows", "single-qwen", "top-p", "--rounds", "2", "--dry-run"])
    commands = capsys.readouterr().out.splitlines()
    assert [c.split()[1].rsplit("/", 1)[-1] for c in commands] == ["throughput.py", "vllm_peer.py"] * 4
    flags = [c.split(" ", 2)[2].rsplit(" --output-json", 1)[0] for c in commands]
    assert flags[0] == flags[1] == flags[2] == flags[3] and flags[4] == flags[5] and "--top-p 0.95" in flags[4]


def test_both_json_rows_get_the_tokenizer_on_both_sides(capsys):
    compare_vllm.main(["--rows", "json", "json-free", "single-qwen", "--tokenizer", "/tok", "--dry-run"])
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 6
    for command in commands[:4]:  # json and json-free, throughput.py then vllm_peer.py
        assert "--tokenizer /tok" in command and "--structured-outputs" in command
    assert "--tokenizer" not in commands[4] and "--tokenizer" not in commands[5]


def test_json_free_stops_at_the_tokenizers_eos_as_json_does():
    # vLLM takes EOS from the tokenizer it is given; jaxllm's `none` must stop at the same id as its `json`
    from jaxllm.loader import default_model_path, load_tokenizer

    try:
        tokenizer = load_tokenizer(default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tiny = '{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2, ' \
           '"num_kv_heads": 1, "head_dim": 32}'
    for mode in ("none", "json"):
        args = throughput.arg_parser().parse_args(["--model-shape", "qwen3-0.6b", "--shape-overrides", tiny,
                                                   "--max-model-len", "64", "--max-num-seqs", "2",
                                                   "--max-num-batched-tokens", "64", "--structured-outputs", mode])
        _, config = throughput.build_llm(args)
        assert config.eos_token_ids == (tokenizer.eos_token_id,)
    args.structured_outputs = "off"  # the random workload ignores EOS: the shape's stays
    assert throughput.build_llm(args)[1].eos_token_ids == (151645,)


def test_an_engine_past_its_timeout_is_an_error_and_its_children_die(tmp_path, monkeypatch):
    """One engine that hangs costs its row a cell, not the run: its process group (vLLM's EngineCore
    included) is killed, and what it printed is kept."""
    script = tmp_path / "hang.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('loading weights', flush=True)\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(compare_vllm, "HERE", str(tmp_path))
    result = compare_vllm.run_engine("hang.py", "--flag 1", str(tmp_path / "out.json"), timeout=3, dry_run=False)
    assert "timed out after 3 s" in result["error"] and "loading weights" in result["error"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is immediate; reaping by init may take a moment
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the engine's child outlived the timeout")
