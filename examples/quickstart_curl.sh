#!/bin/sh
# vLLM's quickstart with curl, `vllm` changed to `jaxllm`:
#   jaxllm serve &      (SmolLM2-135M-Instruct; with `jaxllm serve ORG/NAME`, use that name as "model")
#   sh examples/quickstart_curl.sh [BASE_URL]
set -e
BASE_URL=${1:-http://localhost:8000}

curl -sf "$BASE_URL/v1/models"
echo

curl -sf "$BASE_URL/v1/completions" \
    -H "Content-Type: application/json" \
    -d '{
        "model": "SmolLM2-135M-Instruct",
        "prompt": "San Francisco is a",
        "max_tokens": 7,
        "temperature": 0
    }'
echo

curl -sf "$BASE_URL/v1/chat/completions" \
    -H "Content-Type: application/json" \
    -d '{
        "model": "SmolLM2-135M-Instruct",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Who won the world series in 2020?"}
        ]
    }'
echo
