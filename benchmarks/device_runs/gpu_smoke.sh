#!/usr/bin/env bash
# A short device call: engine correctness against HF on the GPU, and a small throughput run.
# The device copy has no .git: run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp results with the commit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv
python tests/gpu/check_engine.py --log $OUT/check_engine.json > $OUT/check_engine.log 2>&1; echo "check_engine rc=$?"
tail -30 $OUT/check_engine.log
python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 64 --input-len 100:1024 --output-len 100:300 \
    --max-model-len 2048 --output-json $OUT/throughput-smoke.json > $OUT/throughput-smoke.log 2>&1; echo "throughput rc=$?"
grep -v Warning $OUT/throughput-smoke.log | tail -25
