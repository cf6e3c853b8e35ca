#!/usr/bin/env bash
# Device call, tenth session, H100: gpu_suite42 again (that run was noisy: cuDNN 5x its usual time on one
# case), with the half tile kept to block_kv multiples of 128 (the PV wgmma wants K a multiple of 64; the
# check had stopped at block_kv 64). The checks, ptxas's report, all eight cases against 5b92ccf's kernel.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite43.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 200 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 60 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|Used" $OUT/ptxas.log | head -4
timeout -s KILL 300 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --baseline-prefill $D/prefill_5b92ccf.py.txt --out $OUT/kernels-prefill-half-diagonal2-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
