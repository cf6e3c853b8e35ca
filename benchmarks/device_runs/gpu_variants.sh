#!/usr/bin/env bash
# The Llama-3-8B decode step (B=256, L=1k) under variants of how the layer loop reaches its weights:
# XLA's dynamic-slice fusion into cuBLAS, legacy cuBLAS, and the loop unrolled.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() {  # label, then env assignments
  local label=$1; shift
  echo "== $label"
  env "$@" timeout -s KILL 200 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 8 \
    --out /tmp/trace-$label > $OUT/variant-$label.log 2>&1
  echo "rc=$?"; grep -E "^decode step|Compute|memcpy|paged_decode|nvjet|Error|error" $OUT/variant-$label.log | head -12
}
run dsfusion XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true
run dsfusion-nolt "XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_cublaslt=false"
run unroll-full JAXLLM_SCAN_UNROLL=full
