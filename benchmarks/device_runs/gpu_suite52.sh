#!/usr/bin/env bash
# Device call, eleventh session, H100: the kernel is back at 8900d04's; the overlap within a warpgroup once
# more, in FlashAttention-3's exact order (the accumulator rescaled between the QK and the PV issue, while
# the QK runs, instead of before both: prefill_v11_overlap_rescale.py.txt), and the first overlap version
# (f95fb15: prefill_v11_overlap_nobarrier.py.txt) again, against this kernel. ptxas's report for the new one.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite52.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p, kernels
mod = kernels.load_prefill_version('$D/prefill_v11_overlap_rescale.py.txt', 'resc')
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
mod.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptxas.log 2>&1
echo "ptxas rc=$?"; grep -i "spill\|Used\|C7513\|rror" $OUT/ptxas.log | head -6
timeout -s KILL 420 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --baseline-prefill $D/prefill_v11_overlap_rescale.py.txt --baseline-prefill $D/prefill_v11_overlap_nobarrier.py.txt \
  --out $OUT/kernels-prefill-overlap-rescale-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( *nan%) | //'
