#!/usr/bin/env bash
# Device call, tenth session, H100: ablations of 5b92ccf's prefill kernel (pallas_kernels/prefill.py again,
# the tenth session's changes having lost in gpu_suite38/39): each prefill_abl_*.py.txt removes one cost
# (the causal mask, the epilogue, the softmax, the ping-pong between the compute warpgroups), which bounds
# what cutting that cost could gain, more cleanly than the in-kernel profiler whose stamps inflate short
# scopes. Fresh 512 and 2k chunks and 512 over 4k of context, both models.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite40.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 400 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again,mosaic_bkv64_s4 \
  --prefill-cases 512:0,2048:0,512:4096 \
  --baseline-prefill $D/prefill_abl_nomask.py.txt --baseline-prefill $D/prefill_abl_noepi.py.txt \
  --baseline-prefill $D/prefill_abl_nosoftmax.py.txt --baseline-prefill $D/prefill_abl_noturn.py.txt \
  --out $OUT/kernels-prefill-ablations-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
