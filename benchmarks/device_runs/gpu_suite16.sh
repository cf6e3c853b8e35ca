#!/usr/bin/env bash
# Device call, fourth session, final code: the full kernel table, then the Llama-3-8B decode roofline three
# times in separate processes (runs of one process differ by up to 0.5 ms from call to call).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite16.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
echo "== kernels.py"
timeout -s KILL 330 python benchmarks/kernels.py --out $OUT/kernels.json > $OUT/kernels.log 2>&1; echo rc=$?
grep -v "^{\|^\[\|Warning\|paged_attention import" $OUT/kernels.log | tail -42
for i in 1 2 3; do
  echo "== roofline run $i"
  timeout -s KILL 120 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 \
    --output-json $OUT/roofline-llama3-8b-run$i.json > /tmp/roofline-$i.log 2>&1
  echo "rc=$?"; grep "\"step_ms\|x_roofline\|copy_TBps\"" /tmp/roofline-$i.log
done
