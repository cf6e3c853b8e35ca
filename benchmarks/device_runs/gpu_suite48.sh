#!/usr/bin/env bash
# Device call, eleventh session, H100: FlashAttention-3's overlap within a warpgroup (QK of tile k and PV of
# tile k-1 issued together, tile k's softmax while that PV runs) with the turns as two one-way tokens.
# The checks, ptxas's report (registers, spills, whether it serialised the wgmmas), all eight cases
# against 8900d04's kernel.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite48.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|Used\|serializ\|warning\|error" $OUT/ptxas.log | head -8
timeout -s KILL 200 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
timeout -s KILL 280 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --baseline-prefill $D/prefill_8900d04.py.txt --out $OUT/kernels-prefill-overlap-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
