#!/usr/bin/env bash
# Device call, fourth session: does the KV cache's content change the decode step's speed? The roofline
# step over a cache of zeros (as allocated) and of random values, and the decode kernel alone both ways.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite8.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for fill in random zeros; do
  echo "== roofline, cache $fill"
  timeout -s KILL 200 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 --fill $fill \
    --output-json $OUT/roofline-$fill.json > $OUT/roofline-$fill.log 2>&1
  echo "rc=$?"; grep "\"step_ms\|roofline_ms\|x_roofline" $OUT/roofline-$fill.log
done
echo "== decode kernel, random vs zeros"
timeout -s KILL 200 python benchmarks/kernels.py --fill-check --out $OUT/kernels-fill.json > $OUT/fill.log 2>&1
echo "rc=$?"
python - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp/out"), "kernels-fill.json")))
for c in d["cases"]:
    print(c["batch"], c["ctx"], c.get("cache", "random"), {k: round(v["us"]) for k, v in c.items() if isinstance(v, dict) and "us" in v})
PY
echo "== profile, random cache"
timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --batch 256 --context 1024 --top 8 \
  --out /tmp/trace > $OUT/profile-random.log 2>&1
echo "rc=$?"; grep -A10 "one period" $OUT/profile-random.log | head -16
