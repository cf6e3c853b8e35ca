#!/usr/bin/env bash
# Device call, eleventh session, H100: the overlap within a warpgroup with the softmax pinned before the
# wait for the PV (an optimization barrier, as the old step had before its turn): without it the compiler
# may move the softmax past that wait, and the overlap is gone. ptxas's report at the default tiles, and
# all eight cases at 128 / 2 (twice) and 64 / 3 against 8900d04's kernel.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite50.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|Used\|serializ" $OUT/ptxas.log | head -8
timeout -s KILL 420 python benchmarks/kernels.py --prefill \
  --prefill-variants mosaic,mosaic_again,mosaic_bkv64_s3 \
  --baseline-prefill $D/prefill_8900d04.py.txt --out $OUT/kernels-prefill-overlap-barrier-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
