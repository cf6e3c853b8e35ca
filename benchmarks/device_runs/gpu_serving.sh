#!/usr/bin/env bash
# Device call: the OpenAI server on the GPU under benchmarks/serving.py (vLLM's benchmark_serving shape).
# The device has no starlette / uvicorn and no default model: carry `.whl` holding their wheels and a
# tokenizer folder (`load_tokenizer(default_model_path()).save_pretrained(".whl/smollm2-tokenizer")`).
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_serving.sh` with carry [".whl"]; $SERVER_ARGS adds
# server flags, $RATES picks the request rates (default "inf 10"), $TAG names the result files.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAXLLM_COMPILATION_CACHE=/tmp/jaxllm-xla
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python server.py --model-shape qwen3-0.6b --tokenizer .whl/smollm2-tokenizer --max-model-len 2048 --port 8000 \
  ${SERVER_ARGS:-} > $OUT/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 90); do sleep 2; curl -sf localhost:8000/health > /dev/null && break; done
grep "ready\|KV blocks\|compiled [0-9]" $OUT/server.log | tail -3
WORK="--num-prompts 256 --input-len 100:1024 --output-len 100:1024"
for rate in ${RATES:-inf 10}; do
  echo "== serving, request rate $rate"
  timeout -s KILL 200 python benchmarks/serving.py $WORK --request-rate $rate \
    --output-json $OUT/serving-qwen3-0.6b${TAG:-}-rate-$rate.json > /tmp/serving-$rate.log 2>&1
  echo "rc=$?"; grep -E '"(completed|failed|duration_s|request_throughput|output_tokens_per_s|total_tokens_per_s)"|p50|p99|"errors"' /tmp/serving-$rate.log | head -20
done
kill $SERVER; wait $SERVER 2>/dev/null
grep -c " 200 OK" $OUT/server.log; grep -i "error\|traceback" $OUT/server.log | head -5
