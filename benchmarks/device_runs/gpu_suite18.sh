#!/usr/bin/env bash
# Device call, fifth session: the K/V write of decode steps (deferred after the layer loop in f81a189; fused
# into the decode kernel, with the new token folded in from registers, since). The Llama-3-8B decode step
# against its roofline, this tree and the fourth session's last commit (unpacked in base/:
# `git archive 3d38116 | tar -x -C base`) alternating in separate processes; one layer's kernel timeline;
# the kernel and engine checks; the nano-vllm workload when $WORKLOAD is set.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite18.sh`. Everything lands in $OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R
NEW=${JAXLLM_GIT_COMMIT:-new}
roof() {  # tag, folder, commit
  echo "== roofline $1"
  (cd $2 && PYTHONPATH=$PWD JAXLLM_GIT_COMMIT=$3 timeout -s KILL 150 python benchmarks/roofline.py --model-shape llama3-8b \
    --batch 256 --context 1024 --output-json $R/roofline-$1.json > $R/roofline-$1.log 2>&1); echo "rc=$?"
  grep "\"step_ms\|x_roofline" $R/roofline-$1.log
}
roof new1 . $NEW; roof base1 base 3d38116; roof new2 . $NEW; roof base2 base 3d38116
export PYTHONPATH=$PWD
echo "== timeline"
timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --batch 256 --context 1024 --top 12 \
  --out /tmp/trace > $R/timeline.log 2>&1; echo "rc=$?"
grep -v "Warning" $R/timeline.log | tail -30
echo "== check_kernels"
timeout -s KILL 200 python tests/gpu/check_kernels.py --log $R/check_kernels.json > $R/check_kernels.log 2>&1; echo "rc=$?"
grep -c "^PASS" $R/check_kernels.log; grep "^FAIL" $R/check_kernels.log | cut -c1-300 | head; tail -1 $R/check_kernels.log
echo "== check_engine"
timeout -s KILL 150 python tests/gpu/check_engine.py --log $R/check_engine.json > $R/check_engine.log 2>&1; echo "rc=$?"
tail -5 $R/check_engine.log
if [ -n "${WORKLOAD:-}" ]; then
  echo "== nano-vllm workload"
  JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla timeout -s KILL 150 python benchmarks/throughput.py --model-shape qwen3-0.6b \
    --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 \
    --output-json $R/throughput-qwen3-0.6b.json > $R/throughput-qwen3.log 2>&1; echo "rc=$?"
  grep "tok/s" $R/throughput-qwen3.log | tail -2
fi
tar czf $OUT/all.tgz -C $R .
