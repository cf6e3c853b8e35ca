#!/usr/bin/env bash
# Device call, fifth session, on an H100 (the class of GPU of the published vLLM figure for Llama 3.1 8B,
# about 12.5k output tok/s): the Llama-3-8B decode step against its roofline, the Llama-3-8B 1,000-request
# workload and the nano-vllm workload. Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite19.sh`
# with kind nvidia-h100-x1. Everything lands in $OUT/all.tgz. The first call (915d7c5) ran out of memory in the
# roofline and sized the Llama KV cache from a peak set by the float32 draw of the random weights; fixed since.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
step() { echo "== $1"; shift; timeout -s KILL 200 "$@" > $R/$LOG 2>&1; echo "rc=$?"; grep -v "Warning" $R/$LOG | grep "$PAT" | tail -4; }
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 LOG=roofline.log PAT='"step_ms\|x_roofline\|roofline_ms\|copy_TBps"' step roofline \
  python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 --output-json $R/roofline-llama3-8b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 LOG=throughput-llama.log PAT="tok/s\|KV blocks" step "llama3-8b 1000 requests" \
  python benchmarks/throughput.py --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 \
  --max-model-len 512 --output-json $R/throughput-llama3-8b.json
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 LOG=throughput-qwen3.log PAT="tok/s\|KV blocks" step "qwen3-0.6b nano-vllm workload" \
  python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
  --max-model-len 2048 --output-json $R/throughput-qwen3-0.6b.json
tar czf $OUT/all.tgz -C $R .
