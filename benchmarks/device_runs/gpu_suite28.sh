#!/usr/bin/env bash
# Device call, eighth session, on an H100 (kind nvidia-h100-x1): start to ready with the executable cache
# (a warm start loads every step program without tracing) and the Mosaic prefill kernel in the largest
# token bucket only: cold, warm (its greedy tokens must equal the cold run's: programs loaded back vs
# just compiled), warm again; then the prefill-heavy A/B (Mosaic vs Triton) and the nano-vllm workload.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite28.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $R/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $R/$LOG | grep -v "it/s\]" | grep "$PAT" | cut -c1-400 | tail -${TAILN:-4}; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAXLLM_COMPILATION_CACHE=/tmp/xla-startup
PAT="compiled .* programs\|warm-up\|KV blocks\|start_to_ready\|greedy tokens" TAILN=5
LOG=startup-cold.log LIMIT=90 step "startup cold" python benchmarks/startup.py --label cold --output-json $R/startup-cold.json
LOG=startup-warm.log LIMIT=90 step "startup warm" python benchmarks/startup.py --label warm --output-json $R/startup-warm.json \
  --same-tokens-as $R/startup-cold.json
LOG=startup-warm2.log LIMIT=90 step "startup warm again" python benchmarks/startup.py --label warm2 \
  --output-json $R/startup-warm2.json --same-tokens-as $R/startup-cold.json
du -sh /tmp/xla-startup/jaxllm-steps | tee $R/executable-cache-size.txt
tar czf $OUT/all.tgz -C $R .
export JAXLLM_COMPILATION_CACHE=/tmp/xla
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
PAT="tok/s" TAILN=2
JAXLLM_PREFILL=triton LOG=prefill-triton.log LIMIT=150 step "prefill-heavy, Triton only" python benchmarks/throughput.py \
  $PREFILL --output-json $R/throughput-prefill-heavy-triton.json
LOG=prefill-mosaic.log LIMIT=150 step "prefill-heavy, Mosaic in the largest bucket" python benchmarks/throughput.py \
  $PREFILL --output-json $R/throughput-prefill-heavy-mosaic.json
tar czf $OUT/all.tgz -C $R .
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 LOG=throughput-qwen3.log LIMIT=150 step "qwen3-0.6b nano-vllm workload" \
  python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
  --max-model-len 2048 --output-json $R/throughput-qwen3-0.6b.json
tar czf $OUT/all.tgz -C $R .
