#!/usr/bin/env bash
# Device call, tenth session, H100: gpu_suite41's ablations of the epilogue and the softmax redone on the
# kernel the session leaves (turns restarted at each item): is the epilogue now hidden, and how much of
# the remaining time is the softmax's. Fresh 512 and 2k chunks and 512 over 4k, both models.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite47.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 300 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --prefill-cases 512:0,2048:0,512:4096 \
  --baseline-prefill $D/prefill_abl2_noepi_alive.py.txt --baseline-prefill $D/prefill_abl2_nosoftmax.py.txt \
  --out $OUT/kernels-prefill-ablations3-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
