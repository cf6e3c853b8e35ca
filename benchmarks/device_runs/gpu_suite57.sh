#!/usr/bin/env bash
# Device call, eleventh session, H200: the prefill kernel as the session leaves it (8900d04's, turns restarted
# at each item) on an H200, all eight cases, with our Triton ragged kernel and cuDNN in the same run (the
# README's H200 prefill row still had the seventh session's figures), and the prefill checks first.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite57.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 300 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-H200.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
timeout -s KILL 300 python benchmarks/kernels.py --prefill --prefill-variants ours,mosaic,mosaic_again \
  --out $OUT/kernels-prefill-H200.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10
