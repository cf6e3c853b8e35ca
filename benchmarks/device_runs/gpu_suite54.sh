#!/usr/bin/env bash
# Device call, eleventh session, H100: gpu_suite53 put the engine's prefill-heavy workload at 232-233k total
# tok/s with this commit's prefill.py against 240k with 5b92ccf's (one run). Alternated, twice each, to
# tell a difference from the order of the runs.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite54.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
cp pallas_kernels/prefill.py /tmp/prefill_new.py
for r in 1 2; do
  for k in 5b92ccf item-turn; do
    if [ $k = 5b92ccf ]; then cp benchmarks/device_runs/prefill_5b92ccf.py.txt pallas_kernels/prefill.py; else cp /tmp/prefill_new.py pallas_kernels/prefill.py; fi
    timeout -s KILL 120 python benchmarks/throughput.py $PREFILL --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-$k-$r-H100.json > $OUT/$k-$r.log 2>&1
    echo "$k run $r rc=$? $(grep 'total tok/s' $OUT/$k-$r.log | cut -c1-120)"
  done
done
cp /tmp/prefill_new.py pallas_kernels/prefill.py
