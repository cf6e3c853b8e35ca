#!/usr/bin/env bash
# Device call, tenth session, H100: gpu_suite45's A/B repeated on the fresh cases and 512 over 4k (H100
# timings move by a few percent between runs), and the dispatch checks of the kernel the session leaves.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite46.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 200 python tests/gpu/check_kernels.py --kernels dispatch --log $OUT/check_kernels-dispatch-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error\|ALL" $OUT/check.log | head
timeout -s KILL 300 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again --prefill-cases 512:0,2048:0,512:4096 \
  --baseline-prefill $D/prefill_5b92ccf.py.txt --out $OUT/kernels-prefill-item-turn-repeat-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
