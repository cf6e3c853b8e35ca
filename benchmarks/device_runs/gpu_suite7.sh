#!/usr/bin/env bash
# Device call for issue 6 (and 5), fourth session: the Llama-3-8B decode step (B=256, L=1k) after
# hoisting rope's tables and carrying the layer index; two XLA options on the GEMMs and the norms; the
# roofline with back-to-back and one-at-a-time timing; a wider decode-kernel sweep.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite7.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() {  # name, then env assignments for the process
  local name=$1; shift
  echo "== $name: $*"
  env "$@" timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --batch 256 \
    --context 1024 --top 14 --out /tmp/trace-$name > $OUT/$name.log 2>&1
  echo "rc=$?"; grep "decode step\|idle gaps\|one period\|rror" $OUT/$name.log | head -5
}
run default
run no-cublaslt XLA_FLAGS=--xla_gpu_enable_cublaslt=false
run no-triton-norm XLA_FLAGS=--xla_gpu_enable_triton_softmax_fusion=false
echo "== roofline"
timeout -s KILL 200 python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024 \
  --output-json $OUT/roofline-llama3-8b.json > $OUT/roofline.log 2>&1
echo "rc=$?"; grep "step_ms\|roofline_ms\|x_roofline\|copy_TBps\|matmul_TFLOPs\"" $OUT/roofline.log
echo "== decode kernel sweep"
timeout -s KILL 300 python benchmarks/kernels.py --tune-decode --out $OUT/kernels-tune-decode.json > $OUT/tune.log 2>&1
echo "rc=$?"
python - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp/out"), "kernels-tune-decode.json")))
for c in d["cases"]:
    rows = sorted((v["us"], k) for k, v in c.items() if isinstance(v, dict) and "us" in v)
    print(c["model"], c["batch"], c["ctx"], " ".join(f"{k}:{us:.0f}" for us, k in rows[:10]))
PY
