#!/usr/bin/env bash
# Device call, fourth session: the Llama-3-8B decode step (B=256, L=1k, random cache) with the layer loop
# recorded into the command buffer (XLA's WHILE command, optionally unrolled into one CUDA graph),
# against XLA's defaults: roofline (back to back and one at a time) and a profile's idle gaps.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite10.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
variant() {  # name, XLA_FLAGS
  echo "== $1: XLA_FLAGS=$2"
  XLA_FLAGS="$2" timeout -s KILL 150 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 \
    --output-json $OUT/roofline-$1.json > /tmp/roofline-$1.log 2>&1
  echo "rc=$?"; grep "\"step_ms\|x_roofline\|rror" /tmp/roofline-$1.log | head -6
  XLA_FLAGS="$2" timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 3 \
    --out /tmp/trace-$1 > $OUT/profile-$1.log 2>&1
  echo "rc=$?"; grep "decode step\|busy over\|idle gaps" $OUT/profile-$1.log | head -3; grep -A5 "kernel before" $OUT/profile-$1.log | head -5
}
variant default ""
variant while-graph "--xla_gpu_enable_command_buffer=+WHILE --xla_gpu_command_buffer_unroll_loops=true"
variant while-graph-min1 "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_command_buffer_unroll_loops=true --xla_gpu_graph_min_graph_size=1"
