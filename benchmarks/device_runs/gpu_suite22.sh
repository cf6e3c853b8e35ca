#!/usr/bin/env bash
# Device call, sixth session, after the tighter tile bound (min_q_len): dispatch checks, the prefill-heavy
# then the default, and the nano-vllm workload.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite22.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-5}; }
LOG=check_kernels.log TAILN=1 LIMIT=150 step check_kernels python tests/gpu/check_kernels.py --kernels dispatch \
    --log $OUT/check_kernels_dispatch.json
grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL" $OUT/check_kernels.log | cut -c1-300 | head
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
JAXLLM_PREFILL=triton LOG=prefill-triton.log TAILN=3 step "prefill-heavy, triton ragged" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-triton.json
LOG=prefill-mosaic.log TAILN=3 step "prefill-heavy, mosaic prefill" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-mosaic.json
LOG=throughput-qwen3.log TAILN=3 step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b.json
cd $OUT && tar czf all.tgz *.json *.log && rm -f *.json *.log
