#!/usr/bin/env bash
# Device call, eleventh session, H100: where the overlap within a warpgroup loses. Mosaic GPU's in-kernel
# profile of this commit's kernel and of the overlap in FlashAttention-3's order (with scopes around the
# turn, the wait for the PV and the waits for data: prefill_v11_overlap_rescale_prof.py.txt, copied over
# prefill.py), Llama-3-8B heads, 512-token chunks fresh and over 4k of context.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite55.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
cp pallas_kernels/prefill.py /tmp/prefill_new.py
for k in current overlap; do
  [ $k = overlap ] && cp benchmarks/device_runs/prefill_v11_overlap_rescale_prof.py.txt pallas_kernels/prefill.py
  for ctx in 4096 0; do
    timeout -s KILL 120 python benchmarks/profile_prefill.py --model llama-3-8b --chunk 512 --ctx $ctx --tokens 4096 \
      --out $OUT/prefill-profile-$k-ctx$ctx-H100.json >> $OUT/profile.log 2>&1
    echo "$k ctx $ctx rc=$?"
  done
done
cp /tmp/prefill_new.py pallas_kernels/prefill.py
grep -v "Warning" $OUT/profile.log | grep "unprofiled\|compute 0\|^    " | head -80
