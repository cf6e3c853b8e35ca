#!/usr/bin/env bash
# Where a step's device time goes, kernel by kernel, under Nsight Compute (works on the Firecracker machines).
# The Llama-3-8B decode step of the roofline (B=256, L=1k), then the nano-vllm workload's engine steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
NCU="ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv"
ncu --version | tail -1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=jit_decode_step" \
  $NCU --log-file $OUT/decode-llama.csv python benchmarks/profile_step.py decode --model-shape llama3-8b \
  > $OUT/decode-llama.log 2>&1
echo "== decode llama rc=$?"; tail -3 $OUT/decode-llama.log
python benchmarks/profile_step.py summarize $OUT/decode-llama.csv > $OUT/decode-llama.txt 2>&1; head -45 $OUT/decode-llama.txt
(cd $OUT && tar czf hlo.tgz hlo && rm -rf hlo)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 $NCU --log-file $OUT/engine-qwen.csv python benchmarks/profile_step.py engine \
  --model-shape qwen3-0.6b --start-step 300 --profiled 3 > $OUT/engine-qwen.log 2>&1
echo "== engine qwen rc=$?"; grep -E "profiled|compiled|KV blocks" $OUT/engine-qwen.log | tail -3
python benchmarks/profile_step.py summarize $OUT/engine-qwen.csv > $OUT/engine-qwen.txt 2>&1; head -45 $OUT/engine-qwen.txt
gzip -f $OUT/*.csv
