#!/usr/bin/env bash
# Where a step's device time goes, kernel by kernel (jax.profiler / CUPTI): the Llama-3-8B decode step of the
# roofline (B=256, L=1k) with its optimised HLO, then the nano-vllm workload's engine steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=jit_decode_step" timeout -s KILL 240 \
  python benchmarks/profile_step.py decode --model-shape llama3-8b --out /tmp/trace > $OUT/decode-llama.log 2>&1
echo "== decode llama rc=$?"; head -c 6000 $OUT/decode-llama.log
(cd $OUT && tar czf hlo.tgz hlo && rm -rf hlo)
timeout -s KILL 240 python benchmarks/profile_step.py engine --model-shape qwen3-0.6b --start-step 300 --profiled 3 \
  --out /tmp/trace > $OUT/engine-qwen.log 2>&1
echo "== engine qwen rc=$?"; grep -v "^\[" $OUT/engine-qwen.log | head -c 6000
