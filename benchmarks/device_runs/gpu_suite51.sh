#!/usr/bin/env bash
# Device call, eleventh session, H100: the PTX of the overlap kernel with the softmax pinned (ptxas
# serialised its wgmmas, C7513) and without (f95fb15; no C7513, but slower than 8900d04): which non-wgmma
# instruction sits between the QK and PV wgmmas of a round. Llama-3-8B heads, a fresh 512-token chunk.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite51.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
for v in barrier nobarrier; do
  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 90 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p, kernels
f = 'pallas_kernels/prefill.py' if '$v' == 'barrier' else '$D/prefill_v11_overlap_nobarrier.py.txt'
mod = kernels.load_prefill_version(f, 'k_$v')
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
mod.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/ptx_$v.log 2>&1
  echo "$v rc=$? lines $(wc -l < $OUT/ptx_$v.log)"; grep -i "C7513\|spill" $OUT/ptx_$v.log | head -3
done
