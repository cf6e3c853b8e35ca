#!/usr/bin/env bash
# Device call, ninth session: the persistent prefill kernel (one CTA per SM walking (tile, head) items,
# the next item's queries and K/V streamed while the current one finishes). Checks first, then the
# prefill cases with the eighth session's kernel (prefill_eb8aca7.py.txt) timed beside it as 'baseline'
# and cuDNN on the fresh chunks.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite34.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import jax; d = jax.devices()[0]; print(d.device_kind, 'core_count', getattr(d, 'core_count', None))"
timeout -s KILL 200 python tests/gpu/check_kernels.py --kernels prefill,dispatch --log $OUT/check_kernels-prefill-persistent.json > $OUT/check.log 2>&1
echo "check rc=$?"; grep -c '"ok": true' $OUT/check_kernels-prefill-persistent.json; grep -i "fail\|error\|ALL PASS" $OUT/check.log | head -20
timeout -s KILL 330 python benchmarks/kernels.py --prefill --baseline-prefill benchmarks/device_runs/prefill_eb8aca7.py.txt \
  --out $OUT/kernels-prefill-persistent.json > $OUT/kernels-prefill.log 2>&1
echo "bench rc=$?"; grep "^prefill\|ceilings\|Error" $OUT/kernels-prefill.log | tail -20
