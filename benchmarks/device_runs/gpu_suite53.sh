#!/usr/bin/env bash
# Device call, eleventh session, H100: the prefill kernel of the tenth session (turns restarted at each item,
# da1ad89) in the engine, not run before: check_engine, the prefill-heavy workload with this commit's
# prefill.py, then with 5b92ccf's (copied over it), then again with this commit's.
# (The dispatch checks passed on this kernel in the tenth session; prefill.py is byte for byte 8900d04's.)
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite53.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_COMPILATION_CACHE=/tmp/xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $OUT/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $OUT/$LOG | grep -v "it/s\]" | grep "$PAT" | cut -c1-300 | tail -${TAILN:-4}; }
LOG=check_engine.log PAT="" LIMIT=150 TAILN=6 step check_engine python tests/gpu/check_engine.py --log $OUT/check_engine-H100.json
PREFILL="--model-shape qwen3-0.6b --num-prompts 128 --input-len 2048:4096 --output-len 16 --max-model-len 4224"
PAT="tok/s" TAILN=2
LOG=prefill-heavy-item-turn.log LIMIT=120 step "prefill-heavy, item-turn kernel" python benchmarks/throughput.py $PREFILL \
  --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-item-turn-H100.json
cp pallas_kernels/prefill.py /tmp/prefill_new.py
cp benchmarks/device_runs/prefill_5b92ccf.py.txt pallas_kernels/prefill.py
LOG=prefill-heavy-5b92ccf.log LIMIT=120 step "prefill-heavy, 5b92ccf kernel" python benchmarks/throughput.py $PREFILL \
  --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-5b92ccf-H100.json
cp /tmp/prefill_new.py pallas_kernels/prefill.py
LOG=prefill-heavy-item-turn-again.log LIMIT=120 step "prefill-heavy, item-turn kernel again" python benchmarks/throughput.py $PREFILL \
  --output-json $OUT/throughput-qwen3-0.6b-prefill-heavy-item-turn-again-H100.json
