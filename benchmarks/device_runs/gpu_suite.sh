#!/usr/bin/env bash
# One device call for issue 6: engine correctness vs HF on the GPU, the nano-vllm workload against HF's
# continuous batching in the same run, and one decode step against its roofline.
#   device run: bash benchmarks/device_runs/gpu_suite.sh        (results under $OUT)
# The device copy has no .git: run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp results with the commit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v Warning $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-8}; }
LOG=check_engine.log TAILN=30 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine.json
LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --compare-hf generate_batch \
    --output-json $OUT/throughput-qwen3-0.6b.json
LOG=roofline.log TAILN=25 step "roofline llama3-8b B=256 L=1024" python benchmarks/roofline.py --model-shape llama3-8b \
    --batch 256 --context 1024 --output-json $OUT/roofline-llama3-8b.json
