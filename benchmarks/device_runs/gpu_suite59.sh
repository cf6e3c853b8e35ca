#!/usr/bin/env bash
# Device call, eleventh session, H200: the target cases in one run of the code the session leaves:
# decode at batch 32 / 64 over 1k / 8k (ours, the bundled kernel, the reference) and the eight prefill cases
# (the Mosaic kernel, our Triton ragged kernel, cuDNN on fresh chunks), with the targets table beside the JSON.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite59.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 560 python benchmarks/kernels.py --quick --prefill-variants ours,mosaic,mosaic_again \
  --out $OUT/kernels-H200.json > $OUT/kernels.log 2>&1
echo "kernels rc=$?"; grep "^decode\|^prefill\|ceilings" $OUT/kernels.log | tail -20 | cut -c1-250
