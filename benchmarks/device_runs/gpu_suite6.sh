#!/usr/bin/env bash
# Device call for issue 6, third session: the nano-vllm workload against HF transformers in the same run,
# GPU correctness, start-up cold and warm, and the decode roofline with the layer loop unrolled by 2 and 4
# (now that GEMMs are cuBLAS, unrolling no longer trades copies for launches). Run as
# `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite6.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-6}; }
LIMIT=330 LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload, HF generate_batch in the same run" \
    python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
    --max-model-len 2048 --compare-hf generate_batch --output-json $OUT/throughput-qwen3-0.6b.json
LOG=check_engine.log TAILN=12 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine.json
export JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-startup
LOG=startup-cold.log TAILN=3 step "startup cold" python benchmarks/startup.py --label cold --output-json $OUT/startup-cold.json
LOG=startup-warm.log TAILN=3 step "startup warm" python benchmarks/startup.py --label warm --output-json $OUT/startup-warm.json
for u in 2 4; do
JAXLLM_SCAN_UNROLL=$u XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LOG=roofline-unroll$u.log TAILN=3 step "roofline llama3-8b, unroll $u" \
    python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024
done
