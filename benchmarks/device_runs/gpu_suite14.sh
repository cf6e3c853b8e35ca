#!/usr/bin/env bash
# Device call, fourth session: the K/V write fused into the decode kernel (and 2 or 3 pipeline stages by
# the program count). Kernel checks, the Llama-3-8B decode step (roofline and a one-layer timeline), GPU
# correctness of the engine, and both engine workloads. Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite14.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-6}; }
LOG=check_kernels.log TAILN=2 step check_kernels python tests/gpu/check_kernels.py --log $OUT/check_kernels.json
grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL" $OUT/check_kernels.log | cut -c1-300 | head
LOG=roofline.log TAILN=14 LIMIT=150 step roofline python benchmarks/roofline.py --model-shape llama3-8b --batch 256 \
    --context 1024 --output-json $OUT/roofline-llama3-8b.json
timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 6 --out /tmp/trace > /tmp/profile.log 2>&1
echo "rc=$?"; grep "decode step\|busy over\|idle gaps" /tmp/profile.log | head -3; grep -A14 "one period" /tmp/profile.log
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 LOG=check_engine.log TAILN=4 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine.json
LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama.log step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
