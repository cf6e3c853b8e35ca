#!/bin/sh
# Talk to a jaxllm embedding server with curl:
#   python -m jaxllm.serve --model MODEL_FOLDER --task embed --served-model-name all-MiniLM-L6-v2 &
#   sh examples/pooling_curl.sh [BASE_URL]
set -e
BASE_URL=${1:-http://127.0.0.1:8000}

curl -s "$BASE_URL/v1/embeddings" -H "Content-Type: application/json" -d '{
  "model": "all-MiniLM-L6-v2",
  "input": ["The capital of France is Paris.", "JAX is a numerical library."]
}'
echo

curl -s "$BASE_URL/score" -H "Content-Type: application/json" -d '{
  "text_1": "What is the capital of France?",
  "text_2": ["Paris is the capital of France.", "Bananas are yellow."]
}'
echo

curl -s "$BASE_URL/rerank" -H "Content-Type: application/json" -d '{
  "query": "What is the capital of France?",
  "documents": ["Bananas are yellow.", "Paris is the capital of France."],
  "top_n": 1
}'
echo
