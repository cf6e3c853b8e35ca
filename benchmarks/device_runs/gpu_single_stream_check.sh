#!/usr/bin/env bash
# Third device call: tests/gpu/check_engine.py on this branch, then single-stream decode at the engine's
# default limits, main at 529f9dd (./main) and this branch (./br) alternated: Qwen3-0.6B 128 in / 1024 out
# twice each, Llama-3-8B 128 in / 512 out once each.
#   BR_COMMIT=<hash> bash br/benchmarks/device_runs/gpu_single_stream_check.sh   (from the folder holding br/ and main/)
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
R=/tmp/res; mkdir -p $R; LOG=$OUT/log.txt
cp br/benchmarks/throughput.py main/benchmarks/throughput.py
(cd br && timeout 150 python3 tests/gpu/check_engine.py --log $OUT/check_engine.json) >>$LOG 2>&1 || echo "FAILED check_engine rc=$?" >>$LOG
collect() { python3 - <<'PY' >$OUT/summary.txt 2>&1
import glob, json, os
out = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob("/tmp/res/*.json"), key=os.path.getmtime)}
json.dump(out, open(os.environ["OUT"] + "/results.json", "w"), indent=1)
for k, v in out.items():
    print(f"{k:16s} {v['commit']:8s} {v['jaxllm']['output_tokens_per_s']:>9} out tok/s compiles={v['compiles_during_run']} "
          f"load={v['load_s']} wait={v['step_times']['ms_per_step']['wait']}")
PY
}
run() {  # run NAME DIR COMMIT -- ARGS...
  local name=$1 dir=$2 commit=$3; shift 4
  echo "== $name $(date +%T)" >>$LOG
  (cd $dir && JAXLLM_GIT_COMMIT=$commit timeout ${TMO:-90} python3 benchmarks/throughput.py "$@" \
     --output-json $R/$name.json) >>$LOG 2>&1 || echo "FAILED $name rc=$?" >>$LOG
  collect
}
Q="--model-shape qwen3-0.6b --num-prompts 1 --input-len 128 --output-len 1024 --max-model-len 2048"
L="--model-shape llama3-8b --num-prompts 1 --input-len 128 --output-len 512 --max-model-len 1024"
run qwen-br-1 br $BR_COMMIT -- $Q
run qwen-main-1 main 529f9dd -- $Q
run qwen-br-2 br $BR_COMMIT -- $Q
run qwen-main-2 main 529f9dd -- $Q
TMO=130 run llama-br br $BR_COMMIT -- $L
TMO=130 run llama-main main 529f9dd -- $L
python3 -c "import json; d=json.load(open('$OUT/check_engine.json')); print({k: d[k] for k in list(d)[:12]})" 2>&1
cat $OUT/summary.txt
