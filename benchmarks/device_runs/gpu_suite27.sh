#!/usr/bin/env bash
# Device call, eighth session, on an H100 (kind nvidia-h100-x1): start to ready cold and warm after 1409dd0
# (Mosaic prefill kernel only in steps of at least 4096 tokens), the same warm start with the Mosaic kernel
# off (JAXLLM_PREFILL=triton) to see its share, the kernel dispatch checks (the T < 4096 branch had not run
# on a GPU) and the nano-vllm workload.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite27.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $R/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $R/$LOG | grep -v "it/s\]" | grep "$PAT" | tail -${TAILN:-4}; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
JAXLLM_COMPILATION_CACHE=/tmp/xla-startup LOG=startup-cold.log PAT="compiled\|benchmark" LIMIT=90 step "startup cold" \
  python benchmarks/startup.py --label cold --output-json $R/startup-cold.json
JAXLLM_COMPILATION_CACHE=/tmp/xla-startup LOG=startup-warm.log PAT="compiled\|benchmark" LIMIT=90 step "startup warm" \
  python benchmarks/startup.py --label warm --output-json $R/startup-warm.json
JAXLLM_COMPILATION_CACHE=/tmp/xla-startup-triton JAXLLM_PREFILL=triton LOG=startup-triton-cold.log PAT="compiled\|benchmark" LIMIT=90 \
  step "startup cold, Mosaic off" python benchmarks/startup.py --label triton-cold --output-json $R/startup-triton-cold.json
JAXLLM_COMPILATION_CACHE=/tmp/xla-startup-triton JAXLLM_PREFILL=triton LOG=startup-triton-warm.log PAT="compiled\|benchmark" LIMIT=90 \
  step "startup warm, Mosaic off" python benchmarks/startup.py --label triton-warm --output-json $R/startup-triton-warm.json
tar czf $OUT/all.tgz -C $R .
LOG=check_kernels.log PAT="" LIMIT=150 TAILN=6 step "check_kernels dispatch" python tests/gpu/check_kernels.py --kernels dispatch --log $R/check_kernels-dispatch.json
tar czf $OUT/all.tgz -C $R .
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 JAXLLM_COMPILATION_CACHE=/tmp/xla LOG=throughput-qwen3.log PAT="tok/s\|KV blocks" LIMIT=150 \
  step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 \
  --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --output-json $R/throughput-qwen3-0.6b.json
tar czf $OUT/all.tgz -C $R .
