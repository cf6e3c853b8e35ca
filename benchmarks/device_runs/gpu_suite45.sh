#!/usr/bin/env bash
# Device call, tenth session, H100: the ping-pong restarting at each item (each compute warpgroup hands the
# tensor cores over before its epilogue, so the partner's last PV no longer waits for it; the ablations of
# gpu_suite41 put the epilogue at ~10% of a fresh 512-token chunk). The checks, ptxas's report, all eight
# cases against 5b92ccf's kernel.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite45.sh`. Everything lands in $OUT.
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
  --baseline-prefill $D/prefill_5b92ccf.py.txt --out $OUT/kernels-prefill-item-turn-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
