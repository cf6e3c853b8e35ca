#!/usr/bin/env bash
# Device call, eleventh session, H100: gpu_suite55's profile of the overlap put 0.5 us a round into waiting
# for data (the memory warpgroup loads K and V of a tile together, and a V slot frees a round later now,
# so the next K queues behind it) and slowed the softmax (1.2 -> 1.8 us on warpgroup 0). This version
# loads V a tile behind K (K(j), V(j-1)), as FlashAttention-3's producer does, and waits for V at the round
# that uses it (prefill_v11_overlap_kvlag.py.txt). All eight cases against this commit's kernel.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite56.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 420 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --baseline-prefill $D/prefill_v11_overlap_kvlag.py.txt --baseline-prefill $D/prefill_v11_overlap_rescale.py.txt \
  --out $OUT/kernels-prefill-overlap-kvlag-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
