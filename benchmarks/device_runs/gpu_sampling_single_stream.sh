#!/usr/bin/env bash
# One device call: the sampler's filters (threshold search against the sort), single-stream decode under
# the layer loop's variants, and the top-p and temperature rows of the nano-vllm workload, this branch
# (./br) against main at 529f9dd (./main, driven by this branch's benchmarks/throughput.py).
#   BR_COMMIT=<hash> bash br/benchmarks/device_runs/gpu_sampling_single_stream.sh   (from the folder holding br/ and main/)
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
R=/tmp/res; mkdir -p $R; LOG=$OUT/log.txt
cp br/benchmarks/throughput.py main/benchmarks/throughput.py
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv >>$LOG 2>&1
run() {  # run NAME DIR COMMIT ENV... -- ARGS...
  local name=$1 dir=$2 commit=$3; shift 3; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "== $name $(date +%T)" >>$LOG
  (cd $dir && env JAXLLM_GIT_COMMIT=$commit "${envs[@]}" timeout ${TMO:-150} python3 benchmarks/throughput.py "$@" \
     --output-json $R/$name.json) >>$LOG 2>&1 || echo "FAILED $name rc=$?" >>$LOG
  grep -h "output tok/s" $LOG | tail -1
}
(cd br && timeout 150 python3 benchmarks/sampler_bench.py --rows 1 64 256 --ways 16 64 --repeats 15 \
   --output-json $R/sampler.json) >>$LOG 2>&1 || echo "FAILED sampler rc=$?" >>$LOG
SS="--model-shape qwen3-0.6b --num-prompts 1 --input-len 128 --output-len 1024 --max-model-len 2048 --max-num-seqs 16 --max-num-batched-tokens 2048"
run ss-main main 529f9dd X=1 -- $SS
run ss-br br $BR_COMMIT X=1 -- $SS
run ss-br-unroll16 br $BR_COMMIT JAXLLM_UNROLL_MAX_TOKENS=16 -- $SS
run ss-br-unroll16-nocb br $BR_COMMIT JAXLLM_UNROLL_MAX_TOKENS=16 XLA_FLAGS=--xla_gpu_enable_command_buffer= -- $SS
run ss-br-whilegraph br $BR_COMMIT "XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE --xla_gpu_command_buffer_unroll_loops=true" -- $SS
NANO="--model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048"
TMO=200 run topp-br br $BR_COMMIT X=1 -- $NANO --temperature 0.8 --top-p 0.95
TMO=200 run topp-main main 529f9dd X=1 -- $NANO --temperature 0.8 --top-p 0.95
TMO=200 run temp-br br $BR_COMMIT X=1 -- $NANO --temperature 0.6
python3 - <<'PY' >>$LOG 2>&1
import glob, json, os
out = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob("/tmp/res/*.json"))}
json.dump(out, open(os.environ["OUT"] + "/results.json", "w"), indent=1)
for k, v in out.items():
    if "jaxllm" in v:
        print(f"{k:24s} {v['jaxllm']['output_tokens_per_s']:>10} out tok/s  compiles={v['compiles_during_run']} "
              f"steps={v['step_times']}")
PY
tail -12 $LOG
