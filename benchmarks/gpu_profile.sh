#!/usr/bin/env bash
# Where a step's time goes on the device: the nano-vllm workload with async scheduling on and off.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for mode in async sync; do
  flag=""; [ $mode = sync ] && flag="--no-async-scheduling"
  echo "== $mode"
  python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
      --max-model-len 2048 $flag --output-json $OUT/profile-$mode.json 2>&1 | grep -E "^jaxllm|^step times"
done
