#!/usr/bin/env bash
# Device call, sixth session: the Mosaic GPU prefill kernel (pallas_kernels/prefill.py), checked against the
# reference and timed beside the Triton ragged kernel on the prefill cases.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite20.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout -s KILL 120 python benchmarks/device_runs/diag_prefill.py > $OUT/diag.log 2>&1
grep '^DIAG\|^   op =\|^   multiple' $OUT/diag.log | cut -c1-600
grep '^MLIR' $OUT/diag.log | grep -v 'loc(unknown)' | cut -c1-400 | head -40
grep -q '^DIAG OK' $OUT/diag.log || { tail -30 $OUT/diag.log; exit 0; }
timeout -s KILL 240 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_prefill.json \
  > $OUT/check_prefill.log 2>&1
echo "check_kernels rc=$?"; grep -c "^PASS" $OUT/check_prefill.log; grep "^FAIL\|ALL PASS\|SOME FAILED" $OUT/check_prefill.log | cut -c1-300 | head -20
grep -B2 -A12 "Traceback" $OUT/check_prefill.log | head -60
timeout -s KILL 240 python benchmarks/kernels.py --prefill --out $OUT/kernels_prefill.json > $OUT/kernels_prefill.log 2>&1
echo "kernels rc=$?"
grep -v "^{\|^\[\|Warning\|paged_attention import" $OUT/kernels_prefill.log | tail -20
grep -o '"mosaic[a-z0-9_]*": {"error[^}]*' $OUT/kernels_prefill.json | head -5 | cut -c1-400
