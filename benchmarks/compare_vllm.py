"""Rows of the jaxllm-against-vLLM table, both engines alternated on one machine in one go.

    python benchmarks/compare_vllm.py --rounds 2 --output-json results/compare-vllm.json
    python benchmarks/compare_vllm.py --rows single-qwen top-p --dry-run

Each row runs benchmarks/throughput.py and benchmarks/vllm_peer.py with the same flags, each engine in
its own process, jaxllm first, `--rounds` times. One JSON holds every run (device, date, jax and vLLM
versions, commit, each command) and the Markdown table, which is printed last. Where vLLM is not
importable its column says so and only jaxllm runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from throughput import git_commit, write_result  # noqa: E402

NANO = "--model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048"
ROWS = {  # name -> (what the table says, the flags both engines get)
    "nano-vllm": ("Qwen3-0.6B shape, 256 prompts, in and out uniform 100-1024 (nano-vllm's)", NANO),
    "llama-1000": ("Llama-3-8B shape, 1,000 prompts, in 150-250, out 130-230",
                   "--model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 "
                   "--max-model-len 512"),
    "long-prompts": ("Qwen3-0.6B, 64 prompts of 4,000-8,000 tokens, out 256-512",
                     "--model-shape qwen3-0.6b --num-prompts 64 --input-len 4000:8000 --output-len 256:512 "
                     "--max-model-len 8704"),
    "batch-16": ("Qwen3-0.6B, 16 prompts, 512 in, 512 out",
                 "--model-shape qwen3-0.6b --num-prompts 16 --input-len 512 --output-len 512 --max-model-len 2048"),
    "single-qwen": ("Qwen3-0.6B, one prompt, 128 in, 1,024 out",
                    "--model-shape qwen3-0.6b --num-prompts 1 --input-len 128 --output-len 1024 --max-model-len 2048"),
    "single-llama": ("Llama-3-8B, one prompt, 128 in, 512 out",
                     "--model-shape llama3-8b --num-prompts 1 --input-len 128 --output-len 512 --max-model-len 1024"),
    "temperature": ("Qwen3-0.6B, nano-vllm workload, temperature 0.6", NANO + " --temperature 0.6"),
    "top-p": ("Qwen3-0.6B, nano-vllm workload, temperature 0.8, top_p 0.95",
              NANO + " --temperature 0.8 --top-p 0.95"),
    "fp8": ("Llama-3-8B shape, FP8 W8A8 quantized at load, 1,000 prompts, in 150-250, out 130-230",
            "--model-shape llama3-8b --quantization fp8 --num-prompts 1000 --input-len 150:250 --output-len 130:230 "
            "--max-model-len 512"),
    "single-fp8": ("Llama-3-8B shape, FP8 W8A8, one prompt, 128 in, 512 out",
                   "--model-shape llama3-8b --quantization fp8 --num-prompts 1 --input-len 128 --output-len 512 "
                   "--max-model-len 1024"),
    "moe": ("Qwen3-30B-A3B shape (128 experts, 8 active), nano-vllm workload",
            NANO.replace("qwen3-0.6b", "qwen3-30b-a3b")),
    "moe-mixtral": ("Mixtral-8x7B shape (8 experts, 2 active), nano-vllm workload",
                    NANO.replace("qwen3-0.6b", "mixtral-8x7b")),
    "json": ("Qwen3-0.6B shape, nano-vllm workload, each request held to one of 4 JSON schemas (EOS honoured)",
             NANO + " --structured-outputs json"),
    "json-free": ("the same, unconstrained (EOS honoured): the base of the JSON row",
                  NANO + " --structured-outputs none"),
}
# Rows whose EOS (and grammars) come from a tokenizer (--tokenizer): json-free stops at json's EOS, on both sides.
TOKENIZER_ROWS = ("json", "json-free")


def run_engine(script: str, flags: str, out_json: str, timeout: int, dry_run: bool) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *flags.split(), "--output-json", out_json]
    if dry_run:
        print(" ".join(cmd))
        return {"command": " ".join(cmd)}
    # Its own process group: on a timeout the engine's children (vLLM's EngineCore) go too, and free the GPU.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return {"command": " ".join(cmd), "error": f"timed out after {timeout} s; its output ended:\n{output[-2000:]}"}
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": output[-2000:]}
    with open(out_json) as f:
        result = json.load(f)
    result["command"] = " ".join(cmd)
    return result


def tok_s(result: dict, engine: str) -> float | None:
    return (result.get(engine) or {}).get("output_tokens_per_s")


def markdown(rows: dict, vllm_version: str | None) -> str:
    """The README's table: per row, each engine's output tok/s over the rounds, and their ratio."""
    peer = f"vLLM {vllm_version}" if vllm_version else "vLLM (not run: not importable)"
    lines = [f"| workload | {peer} | jaxllm | jaxllm / vLLM |", "| --- | --- | --- | --- |"]
    for name, row in rows.items():
        ours = [t for r in row["jaxllm"] if (t := tok_s(r, "jaxllm"))]
        theirs = [t for r in row["vllm"] if (t := tok_s(r, "vllm"))]
        ratio = ""
        if ours and theirs:
            lo, hi = min(ours) / max(theirs), max(ours) / min(theirs)
            ratio = f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}"
        fmt = lambda xs: " / ".join(f"{x:,.0f}" for x in xs) or "-"  # noqa: E731
        lines.append(f"| {ROWS[name][0]} | {fmt(theirs)} | {fmt(ours)} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two engines per row")
    ap.add_argument("--timeout", type=int, default=900, help="seconds for one engine's process")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--tokenizer", default=None,
                    help="a tokenizer folder for the JSON rows' grammars and EOS (default: the default model's; "
                         "vLLM needs a folder: save the default model's with save_pretrained)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    vllm_spec = importlib.util.find_spec("vllm")
    vllm_version = None
    if vllm_spec is not None and not args.dry_run:
        from importlib.metadata import version

        vllm_version = version("vllm")
    tmp = tempfile.mkdtemp(prefix="compare-vllm-")
    rows = {}
    for name in args.rows:
        flags = ROWS[name][1] + (f" --tokenizer {args.tokenizer}" if name in TOKENIZER_ROWS and args.tokenizer else "")
        row = rows[name] = {"flags": flags, "jaxllm": [], "vllm": []}
        for i in range(args.rounds):
            row["jaxllm"].append(run_engine("throughput.py", flags, f"{tmp}/{name}-jaxllm-{i}.json", args.timeout,
                                            args.dry_run))
            if vllm_spec is not None or args.dry_run:
                result = run_engine("vllm_peer.py", flags, f"{tmp}/{name}-vllm-{i}.json", args.timeout, args.dry_run)
                row["vllm"].append(result)
    table = markdown(rows, vllm_version)
    if args.dry_run:
        return rows
    first = next((r for row in rows.values() for r in row["jaxllm"] if "device" in r), {})
    result = {"benchmark": "compare-vllm", "device": first.get("device"), "jax_version": first.get("jax_version"),
              "vllm_version": vllm_version, "commit": git_commit(), "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "table": table}
    write_result(result, args.output_json, f"compare-vllm-{result['date'][:10]}.json")
    print(table)
    return result


if __name__ == "__main__":
    main()
