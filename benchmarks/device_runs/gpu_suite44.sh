#!/usr/bin/env bash
# Device call, tenth session, H100: the checks of the kernels as the session leaves them (prefill.py is
# 5b92ccf's again: every change tried this session lost or tied on the target case).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite44.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 400 python tests/gpu/check_kernels.py --kernels prefill,dispatch --log $OUT/check_kernels-prefill-dispatch-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error\|ALL" $OUT/check.log | head
