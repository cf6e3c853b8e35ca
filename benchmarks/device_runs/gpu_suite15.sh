#!/usr/bin/env bash
# Device call, fourth session, final code: kernel checks, the Llama-3-8B decode step against its roofline,
# and both engine workloads (jaxllm alone). Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite15.sh`;
# the kernel table is `python benchmarks/kernels.py` on its own.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-5}; }
LOG=check_kernels.log TAILN=1 step check_kernels python tests/gpu/check_kernels.py --log $OUT/check_kernels.json
grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL" $OUT/check_kernels.log | cut -c1-300 | head
LOG=roofline.log TAILN=8 LIMIT=150 step roofline python benchmarks/roofline.py --model-shape llama3-8b --batch 256 \
    --context 1024 --output-json $OUT/roofline-llama3-8b.json
LOG=throughput-qwen3.log TAILN=3 step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --output-json $OUT/throughput-qwen3-0.6b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama.log TAILN=3 step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
rm -f $OUT/*.log.tmp
