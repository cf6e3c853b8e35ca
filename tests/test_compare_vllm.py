"""benchmarks/compare_vllm.py: the table it writes, and the commands it runs (no engine is started)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_vllm  # noqa: E402


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
