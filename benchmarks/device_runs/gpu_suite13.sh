#!/usr/bin/env bash
# Device call, fourth session: the decode kernel with two pipeline stages by default (three before).
# Kernel checks, the full kernel table (with the three-stage kernel beside it), and the decode step.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite13.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
echo "== check_kernels"
timeout -s KILL 200 python tests/gpu/check_kernels.py --log $OUT/check_kernels.json > $OUT/check_kernels.log 2>&1
echo "rc=$?"; grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL\|ALL PASS\|SOME FAILED" $OUT/check_kernels.log | cut -c1-300 | head
echo "== roofline"
timeout -s KILL 150 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 \
  --output-json $OUT/roofline-llama3-8b.json > $OUT/roofline.log 2>&1
echo "rc=$?"; grep "\"step_ms\|x_roofline\|rror" $OUT/roofline.log
echo "== kernels.py"
timeout -s KILL 330 python benchmarks/kernels.py --out $OUT/kernels.json > $OUT/kernels.log 2>&1; echo rc=$?
grep -v "^{\|^\[\|Warning\|paged_attention import" $OUT/kernels.log | tail -42
