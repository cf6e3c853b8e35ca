#!/usr/bin/env bash
# Device call, seventh session, after gpu_suite24.sh: the single tokens of a mixed step go to the decode kernel (keep=, into=), not
# to full ragged tiles. Decode and dispatch checks, the profile again (Mosaic only), the prefill-heavy A/B
# and the nano-vllm workload.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite25.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-5}; }
LOG=check_kernels.log TAILN=1 LIMIT=150 step check_kernels python tests/gpu/check_kernels.py --kernels decode,dispatch \
    --log $OUT/check_kernels_decode_dispatch.json
grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL" $OUT/check_kernels.log | cut -c1-300 | head
grep -B2 -A12 "Traceback" $OUT/check_kernels.log | head -40
if grep -q "^FAIL\|Traceback" $OUT/check_kernels.log; then cd $OUT && tar czf all.tgz *.json *.log; exit 0; fi
ARGS="engine --model-shape qwen3-0.6b --num-prompts 64 --input-len 2048:4096 --output-len 16 --max-model-len 4224 \
  --start-step 6 --profiled 3 --top 16"
for k in mosaic; do
  echo "== profile $k"
  JAXLLM_PREFILL=$k timeout -s KILL 150 python benchmarks/profile_step.py $ARGS --out /tmp/prof-$k > $OUT/profile-$k.log 2>&1
  echo "rc=$?"; grep -v "Warning\|cuda_timer\|it/s\]" $OUT/profile-$k.log | grep -A18 "^== /device:GPU:0 / Stream #14" | head -20
  grep -A6 "^== idle gaps" $OUT/profile-$k.log
done
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
JAXLLM_PREFILL=triton LOG=prefill-triton.log TAILN=3 LIMIT=120 step "prefill-heavy, triton ragged" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-triton.json
LOG=prefill-mosaic.log TAILN=3 LIMIT=120 step "prefill-heavy, mosaic prefill" python benchmarks/throughput.py \
    $PREFILL --output-json $OUT/throughput-prefill-heavy-mosaic.json
LOG=throughput-qwen3.log TAILN=3 LIMIT=150 step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b.json
cd $OUT && tar czf all.tgz *.json *.log && rm -f *.json *.log
