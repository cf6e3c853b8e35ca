#!/usr/bin/env bash
# Device call, seventh session, on an H100 (kind nvidia-h100-x1): issue 6's workloads on today's code, the
# nano-vllm workload with HF transformers' generate_batch in the same run (never measured on an H100
# before), the Llama-3-8B 1,000-request workload, start-up cold and warm, and GPU correctness.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite26.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $R/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $R/$LOG | grep -v "it/s\]" | grep "$PAT" | tail -${TAILN:-4}; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 LOG=throughput-llama.log PAT="tok/s\|KV blocks" LIMIT=150 step "llama3-8b 1000 requests" \
  python benchmarks/throughput.py --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 \
  --max-model-len 512 --output-json $R/throughput-llama3-8b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 LOG=throughput-qwen3.log PAT="tok/s\|ratio\|KV blocks" LIMIT=300 TAILN=6 \
  step "qwen3-0.6b nano-vllm workload, HF generate_batch in the same run" \
  python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
  --max-model-len 2048 --compare-hf generate_batch --output-json $R/throughput-qwen3-0.6b.json
tar czf $OUT/all.tgz -C $R .
export JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-startup XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
LOG=startup-cold.log PAT="" LIMIT=90 TAILN=2 step "startup cold" python benchmarks/startup.py --label cold --output-json $R/startup-cold.json
LOG=startup-warm.log PAT="" LIMIT=60 TAILN=2 step "startup warm" python benchmarks/startup.py --label warm --output-json $R/startup-warm.json
tar czf $OUT/all.tgz -C $R .
LOG=check_engine.log PAT="" LIMIT=120 TAILN=8 step check_engine python tests/gpu/check_engine.py --log $R/check_engine.json
tar czf $OUT/all.tgz -C $R .
