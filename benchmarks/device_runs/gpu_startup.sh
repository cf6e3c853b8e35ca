#!/usr/bin/env bash
# Device call, seventh session, on an H100 (kind nvidia-h100-x1): start to ready, cold then warm, after the
# Mosaic prefill kernel was limited to steps of at least PREFILL_MIN_BUCKET tokens (Mosaic GPU compiles
# its kernels when XLA loads a program, so the persistent cache does not cover them; gpu_suite26.sh
# measured 57.3 s cold and 57.9 s warm with one Mosaic kernel per token bucket).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_startup.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-startup XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for label in cold warm; do
  echo "== startup $label"
  timeout -s KILL 80 python benchmarks/startup.py --label $label --output-json $OUT/startup-$label.json > $OUT/startup-$label.log 2>&1
  echo "rc=$?"; grep '"benchmark"' $OUT/startup-$label.log
done
