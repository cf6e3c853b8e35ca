#!/usr/bin/env bash
# Device calls for issue 6, in two parts that fit the per-call limit: `bash gpu_suite4.sh a` (roofline,
# nano-vllm workload against HF in the same run), then `... b` (roofline, GPU correctness rolled and
# unrolled, Llama-3-8B workload, start-up cold and warm). Keep $OUT to a few files: the device returns
# only so many. Set JAXLLM_SCAN_UNROLL / XLA_FLAGS to run a variant (results/layer-loop-experiment-H200.json). Run as `JAXLLM_GIT_COMMIT=<hash> bash ...` to stamp the results.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v Warning $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-8}; }
if [ "${1:-a}" = a ]; then
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LOG=roofline.log TAILN=12 step "roofline llama3-8b B=256 L=1024" \
    python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 --output-json $OUT/roofline-llama3-8b.json
LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --compare-hf generate_batch \
    --output-json $OUT/throughput-qwen3-0.6b.json
else
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LOG=roofline.log TAILN=12 step "roofline llama3-8b B=256 L=1024" \
    python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 --output-json $OUT/roofline-llama3-8b.json
LOG=check_engine.log TAILN=20 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine.json
JAXLLM_SCAN_UNROLL=full LOG=check_engine_unrolled.log TAILN=20 step "check_engine, layer loop unrolled" \
    python tests/gpu/check_engine.py --log $OUT/check_engine_unrolled.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama.log step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
export JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla-startup
LOG=startup-cold.log step "startup cold" python benchmarks/startup.py --label cold --output-json $OUT/startup-cold.json
LOG=startup-warm.log step "startup warm" python benchmarks/startup.py --label warm --output-json $OUT/startup-warm.json
fi
