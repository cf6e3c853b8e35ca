"""The serving table against vLLM's OpenAI server: both servers on one machine, one after the other, in one go.

    python benchmarks/compare_serving.py --output-json results/compare-serving.json
    python benchmarks/compare_serving.py --request-rates 4 inf --dry-run

For each server in turn (jaxllm, then vLLM), starts it in a process group of its own on a free localhost
port, waits until /v1/models answers, runs benchmarks/serving.py at each request rate (a short warm-up
first), and stops the whole group. Both servers get the same model, max-model-len, gpu-memory-utilization
and engine limits (unset: each server's default, which are vLLM's), with prefix caching off: every rate
sends the same prompts, and a rate must not reuse the previous one's KV blocks. The model is random weights
at --model-shape; vLLM reads the shape's transformers config with dummy weights and no tokenizer, so unlike
jaxllm it does not detokenize, a difference in its favour. One JSON holds the device, date, jax and vLLM
versions, commit, each server's command and each rate's serving.py result; the Markdown table (TTFT and
TPOT p50/p99, output tok/s, and jaxllm / vLLM) is printed last. Where vLLM is not importable its rows say
"not run" and only jaxllm runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from throughput import git_commit, parse_range, write_result  # noqa: E402

SERVERS = ("jaxllm", "vllm")
METRICS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate_label(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def engine_flags(args) -> list[str]:
    """The flags both servers take with the same name and meaning."""
    flags = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
             "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--no-enable-prefix-caching",
             "--seed", str(args.seed), "--disable-uvicorn-access-log"]
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def server_command(server: str, args, port: int, vllm_folder: str) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name(args),
              *engine_flags(args)]
    if server == "jaxllm":
        model = ["--model", args.model] if args.model else ["--model-shape", args.model_shape]
        model += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        return [sys.executable, "-m", "jaxllm.entrypoints.openai.api_server", *model, *common]
    # vLLM's dummy load reads only the config; without a tokenizer it streams token ids and empty text, so it
    # does not detokenize, where jaxllm does: a difference in vLLM's favour.
    model = ["--model", args.model] if args.model else ["--model", vllm_folder, "--load-format", "dummy",
                                                         "--skip-tokenizer-init", "--runner", "generate"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *model, *common]


def served_name(args) -> str:
    return os.path.basename(os.path.normpath(args.model)) if args.model else args.model_shape


def vocab_size(args) -> int:
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            return json.load(f)["vocab_size"]
    from jaxllm.models.shapes import model_shape_config

    return model_shape_config(args.model_shape).vocab_size


def client_command(args, base_url: str, rate: float, num_prompts: int, out_json: str) -> list[str]:
    fmt = lambda r: f"{r[0]}:{r[1]}"  # noqa: E731
    return [sys.executable, os.path.join(HERE, "serving.py"), "--base-url", base_url,
            "--num-prompts", str(num_prompts), "--input-len", fmt(args.input_len), "--output-len", fmt(args.output_len),
            "--vocab-size", str(vocab_size(args)), "--request-rate", rate_label(rate), "--seed", str(args.seed),
            "--output-json", out_json]


def wait_ready(proc: subprocess.Popen, base_url: str, timeout: float, log: str) -> None:
    """Until /v1/models answers. vLLM binds its port before the engine is built, so a connection may be
    accepted and left unanswered: each try has its own short timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready:\n{tail(log)}")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{tail(log)}")


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM to the server's process group, then SIGKILL if it is not gone after `grace` seconds: vLLM's
    engine core is a child process, and the next server needs the GPU's memory back."""
    for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if group_gone(proc, timeout):
            break
    proc.wait()


def group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reaps the leader: as a zombie it would keep the group alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def run_client(cmd: list[str], out_json: str, timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": (proc.stdout + proc.stderr)[-2000:]}
    with open(out_json) as f:
        return {**json.load(f), "command": " ".join(cmd)}


def client_runs(args) -> list[tuple[str, float, int]]:
    """(name, request rate, prompts) of each serving.py run against one server, the warm-up first."""
    runs = [("warmup", float("inf"), args.warmup_prompts)] if args.warmup_prompts else []
    return runs + [(rate_label(r), r, args.num_prompts) for r in args.request_rates]


def run_server(server: str, args, tmp: str, vllm_folder: str) -> dict:
    """One server's record: its command, start-up time, the warm-up's and each rate's serving.py results."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(server, args, port, vllm_folder)
    record = {"command": " ".join(cmd), "rates": {}}
    log = os.path.join(tmp, f"{server}.log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(proc, base_url, args.ready_timeout, log)
        record["ready_s"] = round(time.perf_counter() - start, 1)
        for name, rate, num_prompts in client_runs(args):
            out = os.path.join(tmp, f"{server}-{name}.json")
            result = run_client(client_command(args, base_url, rate, num_prompts, out), out, args.timeout)
            if name == "warmup":
                record["warmup"] = result
            else:
                record["rates"][name] = result
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        record["error"] = str(e)
    finally:
        stop(proc)
        record["log_tail"] = tail(log)
    return record


def dry_run(args) -> None:
    for server in SERVERS:
        print(" ".join(server_command(server, args, 8000, "VLLM_CONFIG_FOLDER")))
        for name, rate, num_prompts in client_runs(args):
            print(" ".join(client_command(args, "http://127.0.0.1:8000", rate, num_prompts, f"{server}-{name}.json")))


def cells(result: dict | None) -> list[str]:
    if not result or not result.get("completed"):
        return ["-"] * (len(METRICS) + 1)
    return [f"{result[m][q]:,.1f}" for m, q in METRICS] + [f"{result['output_tokens_per_s']:,.0f}"]


def ratios(ours: dict | None, theirs: dict | None) -> list[str]:
    if not (ours and ours.get("completed") and theirs and theirs.get("completed")):
        return [""] * (len(METRICS) + 1)
    pairs = [(ours[m][q], theirs[m][q]) for m, q in METRICS]
    pairs.append((ours["output_tokens_per_s"], theirs["output_tokens_per_s"]))
    return [f"{a / b:.2f}" if b else "" for a, b in pairs]


def markdown(servers: dict, rates: list[str], vllm_version: str | None) -> str:
    """Per rate: vLLM's row, jaxllm's row, and jaxllm / vLLM (below 1 is better for latencies, above 1 for tok/s)."""
    peer = f"vLLM {vllm_version}" if vllm_version else "vLLM"
    lines = ["| request rate (req/s) | server | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
             "| output tok/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for rate in rates:
        got = {s: servers[s].get("rates", {}).get(rate) for s in SERVERS}
        for server, label in (("vllm", peer), ("jaxllm", "jaxllm")):
            record, result = servers[server], got[server]
            if "not_run" in record:
                row = [f"{label} (not run: {record['not_run']})"] + ["not run"] * (len(METRICS) + 1)
            else:
                failed = (result or {}).get("failed")
                note = (f" ({failed} of {result['num_prompts']} failed)" if failed else
                        " (error: see the JSON)" if result is None or "error" in result else "")
                row = [label + note] + cells(result)
            lines.append(f"| {rate} | " + " | ".join(row) + " |")
        lines.append(f"| {rate} | jaxllm / vLLM | " + " | ".join(ratios(got["jaxllm"], got["vllm"])) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen3-0.6b", help="random weights at this shape (jaxllm.models.shapes)")
    ap.add_argument("--model", default=None,
                    help="a Hugging Face model folder both servers load (weights and tokenizer) instead of a shape")
    ap.add_argument("--tokenizer", default=None,
                    help="the tokenizer jaxllm's server detokenizes random weights' tokens with (default: the "
                         "default model's; a folder where that is not installed)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=parse_range, default=(100, 1024), help="N or LO:HI (uniform)")
    ap.add_argument("--output-len", type=parse_range, default=(100, 1024), help="N or LO:HI (uniform)")
    ap.add_argument("--request-rates", type=float, nargs="+", default=[4.0, 16.0, float("inf")],
                    help="requests/s (Poisson), each a run of its own; inf = all at once")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: each server's (vLLM's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: each server's (vLLM's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-prompts", type=int, default=16, help="sent all at once before the first rate; 0: none")
    ap.add_argument("--ready-timeout", type=float, default=1200, help="seconds for a server to start")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for one rate's serving.py")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    vllm_version = None
    if importlib.util.find_spec("vllm") is not None and not args.dry_run:
        vllm_version = importlib.metadata.version("vllm")
    if args.dry_run:
        return dry_run(args)
    tmp = tempfile.mkdtemp(prefix="compare-serving-")
    servers = {"jaxllm": run_server("jaxllm", args, tmp, "")}
    if vllm_version is None:
        servers["vllm"] = {"not_run": "not importable"}
    else:
        from vllm_peer import hf_config_folder

        folder = "" if args.model else hf_config_folder(args.model_shape, args.dtype)
        servers["vllm"] = run_server("vllm", args, tmp, folder)
    rates = [rate_label(r) for r in args.request_rates]
    table = markdown(servers, rates, vllm_version)
    first = next((r for s in servers.values() for r in s.get("rates", {}).values() if "device" in r), {})
    result = {"benchmark": "compare-serving", "device": first.get("device"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "jax_version": importlib.metadata.version("jax"), "vllm_version": vllm_version,
              "torch_version": importlib.metadata.version("torch") if vllm_version else None,
              "commit": git_commit(), "command": " ".join(sys.argv),
              "workload": {"model": args.model or args.model_shape, "num_prompts": args.num_prompts,
                           "input_len": list(args.input_len), "output_len": list(args.output_len),
                           "request_rates": rates, "max_model_len": args.max_model_len, "seed": args.seed},
              "servers": servers, "table": table}
    write_result(result, args.output_json, f"compare-serving-{result['date'][:10]}.json")
    print(table)
    return result


if __name__ == "__main__":
    main()
