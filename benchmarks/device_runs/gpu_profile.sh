#!/usr/bin/env bash
# Where a step's time goes on the device: the nano-vllm workload (no peer) under variants of the layer loop.
# The device copy has no .git: run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp results with the commit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() {  # label, then env assignments
  local label=$1; shift
  echo "== $label"
  env "$@" JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-$label python benchmarks/throughput.py --model-shape qwen3-0.6b \
      --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 \
      --output-json $OUT/profile-$label.json > $OUT/profile-$label.log 2>&1
  grep -E "^jaxllm|^step times|compiled [0-9]+ step programs" $OUT/profile-$label.log
}
run unroll-4 JAXLLM_SCAN_UNROLL=4
run unroll-7 JAXLLM_SCAN_UNROLL=7
run cmdbuf-while "XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
