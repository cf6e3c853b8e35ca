#!/usr/bin/env bash
# Device call: where the engine steps of the nano-vllm workload (Qwen3-0.6B shape) and of the Llama-3-8B
# 1,000-request workload spend their device time, kernels and idle gaps (benchmarks/profile_step.py engine).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 150 python benchmarks/profile_step.py engine --model-shape qwen3-0.6b --start-step 300 --profiled 3 --top 25 --out /tmp/trace > $OUT/eq.log 2>&1
echo "== engine qwen rc=$?"; grep -v "^\[\|Warning\|Compiling" $OUT/eq.log | grep -v "^== /device.*Stream #1[5-9]\|MemcpyD2H$\|MemcpyH2D$\|total us  share" | head -75
timeout -s KILL 200 python benchmarks/profile_step.py engine --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 --max-model-len 512 --start-step 200 --profiled 3 --top 25 --out /tmp/trace > $OUT/el.log 2>&1
echo "== engine llama rc=$?"; grep -v "^\[\|Warning\|Compiling" $OUT/el.log | grep -v "^== /device.*Stream #1[5-9]\|MemcpyD2H$\|MemcpyH2D$\|total us  share" | head -75
