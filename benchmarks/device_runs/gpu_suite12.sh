#!/usr/bin/env bash
# Device call, fourth session: the multi-item decode kernel (several (token, kv head) items a program,
# one flat loop over their tiles). Correctness over every kernel check, the sweep of items per program,
# and the Llama-3-8B decode step (B=256, L=1k) with it as the default.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite12.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
echo "== check_kernels"
timeout -s KILL 240 python tests/gpu/check_kernels.py --log $OUT/check_kernels.json > $OUT/check_kernels.log 2>&1
echo "rc=$?"; grep -c "^PASS" $OUT/check_kernels.log; grep "^FAIL\|ALL PASS\|SOME FAILED\|Error" $OUT/check_kernels.log | cut -c1-300 | head -20
echo "== decode sweep"
timeout -s KILL 240 python benchmarks/kernels.py --tune-decode --out $OUT/kernels-tune-decode.json > $OUT/tune.log 2>&1
echo "rc=$?"
python - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp/out"), "kernels-tune-decode.json")))
print("copy ceiling", round(d["ceiling_copy_TBps"], 3))
for c in d["cases"]:
    rows = sorted((v["us"], k) for k, v in c.items() if isinstance(v, dict) and "us" in v)
    errs = [k for k, v in c.items() if isinstance(v, dict) and "error" in v]
    print(c["model"], c["batch"], c["ctx"], " ".join(f"{k}:{us:.1f}" for us, k in rows), "errors:", errs)
PY
echo "== roofline"
timeout -s KILL 150 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 \
  --output-json $OUT/roofline-llama3-8b.json > $OUT/roofline.log 2>&1
echo "rc=$?"; grep "\"step_ms\|x_roofline\|rror" $OUT/roofline.log
timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --top 6 --out /tmp/trace > $OUT/profile.log 2>&1
echo "rc=$?"; grep "decode step\|busy over\|idle gaps" $OUT/profile.log | head -3; grep -A6 "one period" $OUT/profile.log
