#!/usr/bin/env bash
# Second device call: the sampler's parts (sort, cumsum, the matrix-product prefix sums, binary search),
# then single-stream decode and the top-p / temperature rows of the nano-vllm workload, main at 529f9dd
# (./main, driven by this branch's benchmarks/throughput.py) against this branch (./br), alternated.
#   BR_COMMIT=<hash> bash br/benchmarks/device_runs/gpu_sampling_single_stream_2.sh   (from the folder holding br/ and main/)
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
R=/tmp/res; mkdir -p $R; LOG=$OUT/log.txt
cp br/benchmarks/throughput.py main/benchmarks/throughput.py
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv >>$LOG 2>&1
collect() { python3 - <<'PY' >$OUT/summary.txt 2>&1
import glob, json, os
out = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob("/tmp/res/*.json"), key=os.path.getmtime)}
json.dump(out, open(os.environ["OUT"] + "/results.json", "w"), indent=1)
for k, v in out.items():
    if "jaxllm" in v:
        print(f"{k:16s} {v['commit']:8s} {v['jaxllm']['output_tokens_per_s']:>9} out tok/s compiles={v['compiles_during_run']} "
              f"rows={v['step_times']['mean_rows']} wait={v['step_times']['ms_per_step']['wait']}")
PY
}
run() {  # run NAME DIR COMMIT ENV... -- ARGS...
  local name=$1 dir=$2 commit=$3; shift 3; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "== $name $(date +%T)" >>$LOG
  (cd $dir && env JAXLLM_GIT_COMMIT=$commit "${envs[@]}" timeout ${TMO:-100} python3 benchmarks/throughput.py "$@" \
     --output-json $R/$name.json) >>$LOG 2>&1 || echo "FAILED $name rc=$?" >>$LOG
  collect
}
(cd br && JAXLLM_GIT_COMMIT=$BR_COMMIT timeout 110 python3 benchmarks/sampler_bench.py --rows 64 256 --ways 2 4 \
   --repeats 15 --output-json $R/sampler.json) >>$LOG 2>&1 || echo "FAILED sampler rc=$?" >>$LOG
SS="--model-shape qwen3-0.6b --num-prompts 1 --input-len 128 --output-len 1024 --max-model-len 2048 --max-num-seqs 16 --max-num-batched-tokens 2048"
TMO=60 run ss-main-1 main 529f9dd X=1 -- $SS
TMO=60 run ss-br-1 br $BR_COMMIT X=1 -- $SS
TMO=60 run ss-main-2 main 529f9dd X=1 -- $SS
TMO=60 run ss-br-2 br $BR_COMMIT X=1 -- $SS
NANO="--model-shape qwen3-0.6b --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-model-len 2048"
run topp-br-mm br $BR_COMMIT JAXLLM_TOP_P_CUMSUM=matmul -- $NANO --temperature 0.8 --top-p 0.95
run topp-main main 529f9dd X=1 -- $NANO --temperature 0.8 --top-p 0.95
run topp-br br $BR_COMMIT X=1 -- $NANO --temperature 0.8 --top-p 0.95
run temp-br br $BR_COMMIT X=1 -- $NANO --temperature 0.6
run temp-main main 529f9dd X=1 -- $NANO --temperature 0.6
grep -h "'rows'" $LOG
cat $OUT/summary.txt
