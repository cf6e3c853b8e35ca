#!/usr/bin/env bash
# Device call for issue 6 after the step programs moved to cuBLAS GEMMs (llama.step_compiler_options):
# the Llama-3-8B decode roofline, the nano-vllm workload (jaxllm only: `a`; with HF in the same run: `hf`),
# the Llama-3-8B 1,000-request workload with the default batch limits and with 256 seqs / 8192 tokens.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite5.sh [a|hf]`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; timeout -s KILL ${LIMIT:-240} "$@" > $OUT/$LOG 2>&1; echo "rc=$?"; grep -v Warning $OUT/$LOG | grep -v "it/s\]" | tail -${TAILN:-8}; }
HF=""; [ "${1:-a}" = hf ] && HF="--compare-hf generate_batch"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LOG=roofline.log TAILN=12 step "roofline llama3-8b B=256 L=1024" \
    python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 --output-json $OUT/roofline-llama3-8b.json
LIMIT=400 LOG=throughput-qwen3.log step "qwen3-0.6b nano-vllm workload $HF" python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 $HF \
    --output-json $OUT/throughput-qwen3-0.6b.json
[ -n "$HF" ] && exit 0
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama.log step "llama3-8b sharegpt-like" python benchmarks/throughput.py \
    --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 \
    --output-json $OUT/throughput-llama3-8b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 LOG=throughput-llama-256.log step "llama3-8b sharegpt-like, 256 seqs / 8192 tokens" \
    python benchmarks/throughput.py --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 \
    --max-model-len 512 --max-num-seqs 256 --max-num-batched-tokens 8192 --output-json $OUT/throughput-llama3-8b-256.json
