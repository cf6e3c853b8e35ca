#!/usr/bin/env bash
# Device call, tenth session, H100: gpu_suite40's epilogue ablation was void (with no store, the compiler
# dropped the PV matmuls too, as acc went unused). Here: the epilogue under a condition that never holds
# (acc stays live), the output normalised into shared memory but not stored by TMA, and the query slot
# handed back without waiting for the output store's read. Same cases as gpu_suite40.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite41.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 400 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --prefill-cases 512:0,2048:0,512:4096 \
  --baseline-prefill $D/prefill_abl_noepi_alive.py.txt --baseline-prefill $D/prefill_abl_notma.py.txt \
  --baseline-prefill $D/prefill_abl_nowait.py.txt \
  --out $OUT/kernels-prefill-ablations2-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
