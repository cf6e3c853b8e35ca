#!/usr/bin/env bash
# Device call, eighth session, on an H100 (kind nvidia-h100-x1), after gpu_suite28.sh: the KV cache sized from
# XLA's plan for the warm-up step (not the device peak, which a cold start's autotuning raised, so the first
# warm start's cache had another size and no program matched), a second try when loading a program fails,
# random weights drawn by one cached program. Start to ready cold / warm / warm, then issue 6's other
# checks on this code: GPU correctness, the Llama-3-8B workload and the nano-vllm workload.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite29.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
step() { echo "== $1"; shift; local t0=$SECONDS; timeout -s KILL ${LIMIT:-200} "$@" > $R/$LOG 2>&1; echo "rc=$? wall=$((SECONDS-t0))s"; grep -v "Warning\|cuda_timer" $R/$LOG | grep -v "it/s\]" | grep "$PAT" | cut -c1-330 | tail -${TAILN:-4}; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/gpu.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAXLLM_COMPILATION_CACHE=/tmp/xla-startup
PAT="compiled .* programs\|memory:\|executable cache\|start_to_ready\|greedy tokens" TAILN=6
LOG=startup-cold.log LIMIT=90 step "startup cold" python benchmarks/startup.py --label cold --output-json $R/startup-cold.json
for w in warm warm2; do
  LOG=startup-$w.log LIMIT=90 step "startup $w" python benchmarks/startup.py --label $w --output-json $R/startup-$w.json \
    --same-tokens-as $R/startup-cold.json
done
tar czf $OUT/all.tgz -C $R .
export JAXLLM_COMPILATION_CACHE=/tmp/xla
LOG=check_engine.log PAT="" LIMIT=150 TAILN=8 step check_engine python tests/gpu/check_engine.py --log $R/check_engine.json
tar czf $OUT/all.tgz -C $R .
PAT="tok/s\|KV blocks" TAILN=2
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 LOG=throughput-llama.log LIMIT=170 step "llama3-8b 1000 requests" \
  python benchmarks/throughput.py --model-shape llama3-8b --num-prompts 1000 --input-len 150:250 --output-len 130:230 \
  --max-model-len 512 --output-json $R/throughput-llama3-8b.json
tar czf $OUT/all.tgz -C $R .
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 LOG=throughput-qwen3.log LIMIT=150 step "qwen3-0.6b nano-vllm workload" \
  python benchmarks/throughput.py --model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
  --max-model-len 2048 --output-json $R/throughput-qwen3-0.6b.json
tar czf $OUT/all.tgz -C $R .
