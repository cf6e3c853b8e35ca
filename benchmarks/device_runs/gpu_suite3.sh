#!/usr/bin/env bash
# Device call 3 for issue 6 (launcher thread): the nano-vllm workload against HF continuous batching in the same
# run, the same without async scheduling, and Llama-3-8B with ShareGPT-like lengths.
# The device copy has no .git: run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp results with the commit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
show() { grep -E "^jaxllm|^step times|^HF|compiled [0-9]+ step|memory:|KV blocks" $OUT/$1; }
python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
    --max-model-len 2048 --compare-hf generate_batch --output-json $OUT/throughput-qwen3-0.6b.json > $OUT/qwen3.log 2>&1
echo "== qwen3 async rc=$?"; show qwen3.log
python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
    --max-model-len 2048 --no-async-scheduling --output-json $OUT/throughput-qwen3-0.6b-sync.json > $OUT/qwen3-sync.log 2>&1
echo "== qwen3 sync rc=$?"; show qwen3-sync.log
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 python benchmarks/throughput.py --model-shape llama3-8b --num-prompts 1000 \
    --input-len 150:250 --output-len 130:230 --max-model-len 512 --output-json $OUT/throughput-llama3-8b.json > $OUT/llama.log 2>&1
echo "== llama3-8b rc=$?"; show llama.log
