#!/usr/bin/env bash
# Device call: the layer loop's GEMMs without weight-slice copies. (1) pallas_kernels.matmul.layer_matmul
# against XLA's GEMM on a stacked and on a separate weight (benchmarks/layer_matmul.py, with a block sweep);
# (2) the Llama-3-8B decode step (B=256, L=1k) with XLA's dynamic-slice fusion into cuBLAS GEMMs.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/gpu_gemm.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 300 python benchmarks/layer_matmul.py --model-shape llama3-8b --sweep \
  --output-json $OUT/layer-matmul-llama3-8b.json > $OUT/layer-matmul.log 2>&1
echo "== layer_matmul rc=$?"; grep -v "^  " $OUT/layer-matmul.log | tail -20; grep -c "^  " $OUT/layer-matmul.log
run() {  # label, then env assignments
  local label=$1; shift
  echo "== $label"
  env "$@" timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 6 \
    --out /tmp/trace-$label > $OUT/variant-$label.log 2>&1
  echo "rc=$?"; grep -E "^decode step|^==|memcpy|paged_decode|nvjet|gemm|Error|error" $OUT/variant-$label.log | head -14
}
run dsfusion-notriton "XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false"
run notriton "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
