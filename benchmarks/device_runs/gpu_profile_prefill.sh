#!/usr/bin/env bash
# Device call, seventh session: where an engine prefill step's time goes, Triton ragged against the Mosaic
# prefill kernel (the prefill-heavy workload: Qwen3-0.6B shape, prompts of 2-4k tokens, 8192 tokens a step).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_profile_prefill.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
ARGS="engine --model-shape qwen3-0.6b --num-prompts 64 --input-len 2048:4096 --output-len 16 --max-model-len 4224 \
  --start-step 6 --profiled 3 --top 25"
for k in triton mosaic; do
  echo "== $k"
  JAXLLM_PREFILL=$k timeout -s KILL 200 python benchmarks/profile_step.py $ARGS --out /tmp/prof-$k > $OUT/profile-$k.log 2>&1
  echo "rc=$?"; grep -v "Warning\|cuda_timer\|it/s\]" $OUT/profile-$k.log | grep -A27 "^== /device:GPU:0 / XLA Ops\|^== /device:GPU:0 / Stream" | head -60
done
cd $OUT && tar czf all.tgz *.log && rm -f *.log
