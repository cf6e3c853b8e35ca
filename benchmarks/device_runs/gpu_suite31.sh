#!/usr/bin/env bash
# Device call, eighth session, on an H200 (kind nvidia-h200): issue 6's headline ratio on this session's code, the
# nano-vllm workload with HF transformers' continuous batching (generate_batch) in the same run.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite31.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
echo "== qwen3-0.6b nano-vllm workload, HF generate_batch in the same run"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout -s KILL 540 python benchmarks/throughput.py --model-shape qwen3-0.6b \
  --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --compare-hf generate_batch \
  --output-json $R/throughput-qwen3-0.6b-with-hf.json > $R/throughput-qwen3-hf.log 2>&1
echo "rc=$?"; grep -v "Warning\|cuda_timer\|it/s\]" $R/throughput-qwen3-hf.log | grep "tok/s\|ratio\|KV blocks" | tail -6
tar czf $OUT/all.tgz -C $R .
