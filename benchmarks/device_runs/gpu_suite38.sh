#!/usr/bin/env bash
# Device call, tenth session, H100: the prefill kernel's per-item costs from the ninth session's profile
# (the next item's queries loaded after this item's first K/V, the schedule prefetched an item ahead, a
# cheap causal mask, one reciprocal a row in the epilogue). Checks, the prefill cases against 5b92ccf's
# kernel (prefill_5b92ccf.py.txt) and cuDNN, profiles of the fresh 512 cases, ptxas's register report.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite38.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 170 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
timeout -s KILL 220 python benchmarks/kernels.py --prefill --baseline-prefill benchmarks/device_runs/prefill_5b92ccf.py.txt \
  --out $OUT/kernels-prefill-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10
run() { timeout -s KILL 100 python benchmarks/profile_prefill.py "$@" 2>&1 | grep -v "^W0\|^I0" | tail -30; }
run --model qwen3-0.6b --chunk 512 --ctx 0 --tokens 4096 --space 160 --out $OUT/profile-prefill-qwen-512-0.json
run --model llama-3-8b --chunk 512 --ctx 0 --tokens 4096 --space 160 --out $OUT/profile-prefill-llama-512-0.json
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|registers" $OUT/ptxas.log | head -6
