#!/usr/bin/env bash
# Device call, eleventh session, H100: decode's 128-token tiles (f5d8eeb) in the engine. The nano-vllm
# workload (Qwen3-0.6B shape, 256 requests, prompt and output uniform in [100, 1024]) ends with the batch
# shrinking under 33 sequences, where the new tiles apply; alternated with 8900d04's decode.py copied in.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite62.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
W="--model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048"
cp pallas_kernels/decode.py /tmp/decode_new.py
for r in 1 2; do
  for k in bk128 8900d04; do
    if [ $k = 8900d04 ]; then cp benchmarks/device_runs/decode_8900d04.py.txt pallas_kernels/decode.py; else cp /tmp/decode_new.py pallas_kernels/decode.py; fi
    timeout -s KILL 130 python benchmarks/throughput.py $W --output-json $OUT/throughput-qwen3-0.6b-nano-$k-$r-H100.json > $OUT/$k-$r.log 2>&1
    echo "$k run $r rc=$? $(grep 'output tok/s' $OUT/$k-$r.log | tail -1 | cut -c1-140)"
  done
done
cp /tmp/decode_new.py pallas_kernels/decode.py
