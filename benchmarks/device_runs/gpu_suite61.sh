#!/usr/bin/env bash
# Device call, eleventh session (run on an H200 and on an H100): decode picks 128-token tiles when unsplit
# programs are at most two an SM (`choose_block_k`, from gpu_suite60's sweep). The decode checks (a batch-32
# case reaches the new tiles), then the decode target cases with the old and new tiles side by side
# ("bk64", "bk128"; "ours" is the default choice), and the targets table.
# Run as `JAXLLM_GIT_COMMIT=<hash> GPU=H200 bash benchmarks/device_runs/gpu_suite61.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout -s KILL 200 python tests/gpu/check_kernels.py --kernels decode --log $OUT/check_kernels-decode-$GPU.json > $OUT/check.log 2>&1
echo "check rc=$? pass $(grep -c ^PASS $OUT/check.log) fail $(grep -c ^FAIL $OUT/check.log)"; grep "^FAIL\|Error\|128-token" $OUT/check.log | head
timeout -s KILL 300 python benchmarks/kernels.py --decode --quick --out $OUT/kernels-decode-bk-$GPU.json > $OUT/kernels.log 2>&1
echo "decode rc=$?"
python - <<'PY'
import json, os
d = json.load(open(f"{os.environ.get('OUT', '/tmp/out')}/kernels-decode-bk-{os.environ['GPU']}.json"))
copy = d["ceiling_copy_TBps"]
for c in d["cases"]:
    f = lambda k: f"{c[k]['us']:7.1f} ({c['kv_bytes'] / c[k]['us'] / 1e6 / copy:4.0%})" if "us" in c.get(k, {}) else "   -   "
    print(c["model"][:5], c["batch"], c["ctx"], "ours", f("ours"), "again", f("ours_again"), "bk64", f("bk64"),
          "bk128", f("bk128"), "bundled k4", f("bundled_k4"))
PY
