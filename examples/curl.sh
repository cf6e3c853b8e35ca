#!/bin/sh
# Talk to a running jaxllm server with curl:  python server.py &  then  sh examples/curl.sh [BASE_URL]
set -e
BASE_URL=${1:-http://127.0.0.1:8000}

curl -s "$BASE_URL/v1/models"
echo

curl -s "$BASE_URL/v1/completions" -H "Content-Type: application/json" -d '{
  "model": "SmolLM2-135M-Instruct",
  "prompt": "The capital of France is",
  "max_tokens": 16,
  "temperature": 0
}'
echo

curl -s "$BASE_URL/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "SmolLM2-135M-Instruct",
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 16,
  "temperature": 0
}'
echo

curl -sN "$BASE_URL/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "SmolLM2-135M-Instruct",
  "messages": [{"role": "user", "content": "Say hello."}],
  "max_tokens": 16,
  "stream": true
}'
echo

curl -s "$BASE_URL/generate" -d '{
  "prompt": "The capital of France is",
  "n": 4,
  "temperature": 0,
  "use_beam_search": true,
  "max_tokens": 8
}'
echo

curl -s "$BASE_URL/v1/completions" -H "Content-Type: application/json" \
  -d '{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "return_token_ids": true}'
echo
