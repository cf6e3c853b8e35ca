#!/usr/bin/env bash
# Device call, fourth session, after the layer-loop change (rope tables once a step, layer index in the
# carry): GPU correctness, then both engine workloads (jaxllm alone; HF's figures are in earlier runs).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite11.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-240} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v Warning $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-6}; }
LOG=check_engine.log TAILN=10 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LIMIT=200 LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload" \
    python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
    --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LIMIT=240 LOG=throughput-llama.log step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
