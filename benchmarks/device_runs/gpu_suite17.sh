#!/usr/bin/env bash
# Device call, fourth session, last: kernel checks and the kernel table after the pipeline-depth fix.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite17.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 200 python tests/gpu/check_kernels.py --log $OUT/check_kernels.json > $OUT/check_kernels.log 2>&1
echo "check_kernels rc=$?"; grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL\|ALL PASS\|SOME FAILED" $OUT/check_kernels.log | cut -c1-300 | head
timeout -s KILL 330 python benchmarks/kernels.py --out $OUT/kernels.json > $OUT/kernels.log 2>&1; echo "kernels rc=$?"
grep -v "^{\|^\[\|Warning\|paged_attention import" $OUT/kernels.log | tail -42
