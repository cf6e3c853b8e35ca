#!/usr/bin/env bash
# Device call for issue 6, fourth session: what the ~2 ms of idle time in the Llama-3-8B decode step
# (B=256, L=1k) is. The step under XLA's command-buffer settings and loop forms, each in its own process
# (XLA_FLAGS are read once), with a kernel timeline of one layer and the optimised HLO of the default.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() {  # name, then env assignments for the process
  local name=$1; shift
  echo "== $name: $*"
  env "$@" timeout -s KILL 150 python benchmarks/profile_step.py decode --model-shape llama3-8b --batch 256 \
    --context 1024 --top 12 --out /tmp/trace-$name > $OUT/$name.log 2>&1
  echo "rc=$?"; grep "decode step\|idle gaps\|one period" $OUT/$name.log
}
run default XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=jit_decode_step"
f=$(ls /tmp/hlo/*jit_decode_step*after_optimizations.txt | head -1)
{ echo "$f"; grep -c "command_buffer" "$f"; grep -n " while(\|known_trip_count\|dynamic-slice(\|dynamic_slice" "$f" | cut -c1-400 | head -40; } > $OUT/hlo-summary.txt
gzip -c "$f" > $OUT/hlo-default.txt.gz
head -20 $OUT/hlo-summary.txt
run nocmdbuf XLA_FLAGS=--xla_gpu_enable_command_buffer=
run cmdbuf-while XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL
run unrolled JAXLLM_SCAN_UNROLL=full
run unrolled-nocmdbuf JAXLLM_SCAN_UNROLL=full XLA_FLAGS=--xla_gpu_enable_command_buffer=
