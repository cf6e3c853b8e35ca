#!/usr/bin/env bash
# Device call, ninth session, H100: the persistent prefill kernel in the engine. GPU correctness
# (check_engine), the prefill-heavy workload with this commit's prefill.py and then with the eighth
# session's (prefill_eb8aca7.py.txt, copied over it), then the dispatch checks with Mosaic at any step size.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite37.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | grep "$PAT" | cut -c1-300 | tail -${TAILN:-4}; }
LOG=check_engine.log PAT="" LIMIT=150 TAILN=6 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine-H100.json
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
PAT="tok/s" TAILN=2
LOG=prefill-heavy-persistent.log LIMIT=120 step "prefill-heavy, persistent kernel" python benchmarks/throughput.py $PREFILL \
  --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-persistent-H100.json
cp pallas_kernels/prefill.py /tmp/prefill_new.py
cp benchmarks/device_runs/prefill_eb8aca7.py.txt pallas_kernels/prefill.py
LOG=prefill-heavy-eb8aca7.log LIMIT=120 step "prefill-heavy, eb8aca7 kernel" python benchmarks/throughput.py $PREFILL \
  --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-eb8aca7-H100.json
cp /tmp/prefill_new.py pallas_kernels/prefill.py
LOG=check-dispatch.log PAT="ALL PASS\|SOME FAIL\|^FAIL" LIMIT=130 step "dispatch checks" \
  python tests/gpu/check_kernels.py --kernels dispatch --log $OUT/check_kernels-dispatch-persistent-H100.json
echo "pass $(grep -c ^PASS $OUT/check-dispatch.log) fail $(grep -c ^FAIL $OUT/check-dispatch.log)"
