#!/usr/bin/env bash
# Device call, fourth session: two ways of feeding the norm weights to the layer loop (profile), then the
# full kernel benchmark with back-to-back timing, and its wall clock against CUPTI device time.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
for v in closure prescale; do
  echo "== norm $v"
  JAXLLM_NORM_EXP=$v timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 4 --out /tmp/t-$v > $OUT/norm-$v.log 2>&1
  echo rc=$?; grep "decode step\|idle gaps" $OUT/norm-$v.log; grep -A18 "one period" $OUT/norm-$v.log | tail -17 | cut -c1-90
done
echo "== kernels.py"
timeout -s KILL 420 python benchmarks/kernels.py --out $OUT/kernels.json > $OUT/kernels.log 2>&1; echo rc=$?
grep -v "^{\|^\[\|Warning" $OUT/kernels.log | tail -60
echo "== wall clock against device time"
timeout -s KILL 120 python benchmarks/kernels.py --fill-check --out /tmp/kf.json > $OUT/fill.log 2>&1; echo rc=$?
grep -v "^\[\|Warning" $OUT/fill.log | grep "kernel trace\|paged\|\"batch\"" | cut -c1-200
