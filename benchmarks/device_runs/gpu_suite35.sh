#!/usr/bin/env bash
# Device call, ninth session: where the persistent prefill kernel's time goes on fresh chunks
# (benchmarks/profile_prefill.py, Mosaic GPU's in-kernel profiler), and whether its compute warpgroups
# spill registers (ptxas's report and the SASS's local loads and stores).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_suite35.sh`. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
so=$(python -c "import jax_plugins, os; print(os.path.dirname(jax_plugins.__path__[0]))" 2>/dev/null)
find / -name "*.so" -path "*cuda*plugin*" 2>/dev/null | head -3
for f in $(find / -name "*.so" -path "*jax*cuda*" 2>/dev/null | head -20); do strings $f | grep -E "^MOSAIC_GPU_[A-Z_]+$"; done | sort -u | tr '\n' ' '; echo
run() { timeout -s KILL 120 python benchmarks/profile_prefill.py "$@" 2>&1 | grep -v "^W0\|^I0" | tail -40; }
run --model llama-3-8b --chunk 512 --ctx 0 --tokens 4096 --space 160 --out $OUT/profile-prefill-llama-512-0.json
run --model qwen3-0.6b --chunk 512 --ctx 0 --tokens 4096 --space 160 --out $OUT/profile-prefill-qwen-512-0.json
run --model llama-3-8b --chunk 2048 --ctx 0 --tokens 2048 --space 280 --out $OUT/profile-prefill-llama-2048-0.json
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout -s KILL 120 python -c "
import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks')
import profile_prefill as p
args, scale = p.inputs('llama-3-8b', 512, 0, 1024)
p.ragged_paged_attention(*args, scale=scale).block_until_ready()" > $OUT/sass.log 2>&1
echo "sass rc=$? lines $(wc -l < $OUT/sass.log)"; grep -i "spill\|registers\|smem" $OUT/sass.log | head -10
echo "LDL $(grep -c 'LDL' $OUT/sass.log) STL $(grep -c 'STL' $OUT/sass.log)"
gzip -f $OUT/sass.log
