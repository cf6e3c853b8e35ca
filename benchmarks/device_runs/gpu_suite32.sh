#!/usr/bin/env bash
# Device call, eighth session, on an H200 (kind nvidia-h200): the prefill kernel cases with cuDNN's fused
# attention beside ours on fresh chunks (gpu_suite30.sh ran them on an H100; the seventh session's
# prefill figures are H200's).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite32.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout -s KILL 280 python benchmarks/kernels.py --prefill --out $OUT/kernels-prefill-cudnn-H200.json > $OUT/kernels-prefill.log 2>&1
echo "rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10
