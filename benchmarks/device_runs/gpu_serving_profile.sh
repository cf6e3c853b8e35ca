#!/usr/bin/env bash
# Device call: where the OpenAI server's event-loop thread spends its time with 256 streams at once
# (cProfile of the main thread, which runs the asyncio loop; the engine runs on its own threads).
# Run as `bash benchmarks/device_runs/gpu_serving_profile.sh` with carry [".whl"] (see gpu_serving.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m cProfile -o /tmp/server.prof server.py --model-shape qwen3-0.6b --tokenizer .whl/smollm2-tokenizer \
  --max-model-len 2048 --port 8000 --log-level warning > $OUT/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 90); do sleep 2; curl -sf localhost:8000/health > /dev/null && break; done
timeout -s KILL 200 python benchmarks/serving.py --num-prompts 256 --input-len 100:1024 --output-len 100:1024 \
  --request-rate inf --output-json $OUT/serving-profiled.json > /tmp/serving.log 2>&1
grep -E '"output_tokens_per_s"|"failed"' /tmp/serving.log
kill -INT $SERVER; wait $SERVER
python - <<'PY' > $OUT/server-profile.txt
import pstats
s = pstats.Stats("/tmp/server.prof")
s.sort_stats("tottime").print_stats(45)
s.sort_stats("cumulative").print_stats(45)
PY
head -c 9000 $OUT/server-profile.txt | tail -c 7000
