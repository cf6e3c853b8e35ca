#!/usr/bin/env bash
# Device call, seventh session: the prefill kernel reading q and writing its output in place (flat tiles,
# no XLA gathers), checked through the kernel and the dispatch, timed beside the sixth session's
# tile-major kernel (f1ab836) in one run, then the prefill-heavy engine A/B.
# First `git show f1ab836:pallas_kernels/prefill.py > benchmarks/device_runs/baseline_prefill_f1ab836.py` (left
# untracked: it travels with the call), then `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite23.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-5}; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
LOG=check_kernels.log TAILN=1 LIMIT=200 step check_kernels python tests/gpu/check_kernels.py --kernels prefill,dispatch \
    --log $OUT/check_kernels_prefill_dispatch.json
grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL" $OUT/check_kernels.log | cut -c1-300 | head
grep -B2 -A12 "Traceback" $OUT/check_kernels.log | head -40
if grep -q "^FAIL\|Traceback" $OUT/check_kernels.log; then cd $OUT && tar czf all.tgz *.json *.log; exit 0; fi
BASE=benchmarks/device_runs/baseline_prefill_f1ab836.py
LOG=kernels_prefill.log TAILN=10 LIMIT=200 step "prefill kernels, A/B" python benchmarks/kernels.py --prefill \
    --baseline-prefill $BASE --out $OUT/kernels_prefill.json
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
JAXLLM_PREFILL=triton LOG=prefill-triton.log TAILN=3 LIMIT=120 step "prefill-heavy, triton ragged" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-triton.json
LOG=prefill-mosaic.log TAILN=3 LIMIT=120 step "prefill-heavy, mosaic prefill" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-mosaic.json
cd $OUT && tar czf all.tgz *.json *.log && rm -f *.json *.log
