#!/usr/bin/env bash
# Device call, eighth session, on an H100 (kind nvidia-h100-x1): the nano-vllm workload with this commit's
# model_runner.py, then with its parent's (the per-row numpy prepare), in the same call: the workload is
# host-bound on H100 hosts (5-6.7 ms of host work a step in gpu_suite27-29).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite33.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { timeout -s KILL 85 python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 \
  --output-len 100:1024 --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b-$1.json > $OUT/$1.log 2>&1
  echo "== $1 rc=$?"; grep "tok/s" $OUT/$1.log | tail -1; }
cp benchmarks/device_runs/model_runner_0ed2cf6.py.txt /tmp/model_runner_0ed2cf6.py
run new-prepare
cp /tmp/model_runner_0ed2cf6.py jaxllm/model_runner.py  # ee70634's parent, shipped beside this script
run old-prepare
