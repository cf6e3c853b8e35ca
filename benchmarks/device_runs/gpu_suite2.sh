#!/usr/bin/env bash
# Device call 2 for issue 6 (async engine): the nano-vllm workload against HF continuous batching in the same
# run, Llama-3-8B with ShareGPT-like lengths, and start-to-ready cold and with the compilation cache.
# The device copy has no .git: run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp results with the commit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v Warning $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-6}; }
export JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-startup
LOG=startup-cold.log step "startup cold" python benchmarks/startup.py --label cold
LOG=startup-warm.log step "startup warm" python benchmarks/startup.py --label warm
export JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --compare-hf generate_batch \
    --output-json $OUT/throughput-qwen3-0.6b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama.log step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
