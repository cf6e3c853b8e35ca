#!/usr/bin/env bash
# Device call, ninth session, H100: the persistent prefill kernel after the profile (gpu_suite35.sh):
# one schedule array, snake-order rounds, the query slot handed back at the next item's start. Checks,
# the prefill cases against the eighth session's kernel (prefill_eb8aca7.py.txt) and cuDNN, then the
# decode target cases against the bundled kernel on this H100 (the decode tables so far are H200's).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite36.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 170 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-persistent-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
timeout -s KILL 200 python benchmarks/kernels.py --prefill --baseline-prefill benchmarks/device_runs/prefill_eb8aca7.py.txt \
  --out $OUT/kernels-prefill-persistent-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10
timeout -s KILL 150 python benchmarks/kernels.py --decode --quick --out $OUT/kernels-decode-H100.json > $OUT/kernels-decode.log 2>&1
echo "decode rc=$?"; grep "^decode\|ceilings" $OUT/kernels-decode.log | tail -10
