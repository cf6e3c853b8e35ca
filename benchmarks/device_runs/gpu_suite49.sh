#!/usr/bin/env bash
# Device call, eleventh session, H100: the overlap within a warpgroup (f95fb15) lost 5-14% at 128-token K/V
# tiles, and ptxas spilled 48 bytes (a 64 x 128 score tile more in flight). With 64-token tiles the
# tiles in flight are half the registers: ptxas's report at 64 / 3 stages, and all eight cases with 64-token
# tiles in 3 and 4 stages against 8900d04's kernel at its default (128 / 2).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite49.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale, block_kv=64, num_stages=3).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|Used\|serializ" $OUT/ptxas.log | head -8
timeout -s KILL 420 python benchmarks/kernels.py --prefill \
  --prefill-variants mosaic,mosaic_bkv64_s3,mosaic_bkv64_s4 \
  --baseline-prefill $D/prefill_8900d04.py.txt --out $OUT/kernels-prefill-overlap-bkv64-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
