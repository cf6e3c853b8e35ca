#!/usr/bin/env bash
# Device call, eighth session, on an H100 (kind nvidia-h100-x1), after gpu_suite29.sh: the Mosaic GPU module is
# imported before programs are loaded from the executable cache (it names the runtime library that a loaded
# Mosaic kernel links against; without it every such load failed). Start to ready cold / warm / warm; then
# the prefill kernel cases with cuDNN's fused attention beside ours on fresh chunks (the peer for issue 5's
# fresh-chunk target).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite30.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $R/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $R/$LOG | grep -v "it/s\]" | grep "$PAT" | cut -c1-330 | tail -${TAILN:-4}; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAXLLM_COMPILATION_CACHE=/tmp/xla-startup
PAT="compiled .* programs\|executable cache\|start_to_ready\|greedy tokens" TAILN=4
LOG=startup-cold.log LIMIT=90 step "startup cold" python benchmarks/startup.py --label cold --output-json $R/startup-cold.json
for w in warm warm2; do
  LOG=startup-$w.log LIMIT=90 step "startup $w" python benchmarks/startup.py --label $w --output-json $R/startup-$w.json \
    --same-tokens-as $R/startup-cold.json
done
tar czf $OUT/all.tgz -C $R .
LOG=kernels-prefill.log PAT="^prefill\|ceilings" TAILN=12 LIMIT=300 step "prefill kernels with cuDNN on fresh chunks" \
  python benchmarks/kernels.py --prefill --out $R/kernels-prefill-cudnn-H100.json
tar czf $OUT/all.tgz -C $R .
