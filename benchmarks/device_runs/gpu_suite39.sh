#!/usr/bin/env bash
# Device call, tenth session, H100: gpu_suite38.sh's kernel lost to 5b92ccf's everywhere (loading the next
# item's queries after the first K/V tile held up the K/V stream, and ptxas spilled). That change is
# reverted; here each remaining change is timed alone on top of 5b92ccf (prefill_v10_*.py.txt) and all
# together (pallas_kernels/prefill.py, "mosaic"), with ptxas's register report for each.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite39.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
D=benchmarks/device_runs
timeout -s KILL 150 python tests/gpu/check_kernels.py --kernels prefill --log $OUT/check_kernels-prefill-H100.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error" $OUT/check.log | head
MOSAIC_GPU_DUMP_PTXAS=1 timeout -s KILL 120 python - > $OUT/ptxas.log 2>&1 <<'PY'
import importlib.machinery, importlib.util, sys
sys.path.insert(0, "benchmarks")
import profile_prefill as p
args, scale = p.inputs("llama-3-8b", 512, 0, 1024)
for f in ["pallas_kernels/prefill.py"] + [f"benchmarks/device_runs/prefill_{n}.py.txt" for n in
          ("5b92ccf", "v10_recip", "v10_mask", "v10_prefetch", "v10_all3")]:
    name = f.split("/")[-1].split(".")[0]
    spec = importlib.util.spec_from_file_location(name, f, loader=importlib.machinery.SourceFileLoader(name, f))
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    print("=== " + f, flush=True)
    m.ragged_paged_attention(*args, scale=scale).block_until_ready()
    sys.stdout.flush(); sys.stderr.flush()
PY
echo "ptxas rc=$?"; grep "^===\|spill\|Used" $OUT/ptxas.log | grep -v "^ptxas info    : Compiling\|^    " | head -20
timeout -s KILL 400 python benchmarks/kernels.py --prefill --prefill-variants mosaic,mosaic_again \
  --baseline-prefill $D/prefill_5b92ccf.py.txt --baseline-prefill $D/prefill_v10_recip.py.txt \
  --baseline-prefill $D/prefill_v10_mask.py.txt --baseline-prefill $D/prefill_v10_prefetch.py.txt \
  --baseline-prefill $D/prefill_v10_all3.py.txt --out $OUT/kernels-prefill-H100.json > $OUT/kernels-prefill.log 2>&1
echo "prefill rc=$?"; grep "^prefill\|ceilings" $OUT/kernels-prefill.log | tail -10 | sed 's/triton *nan us (again *nan) *nan TFLOP\/s ( nan%) | //'
