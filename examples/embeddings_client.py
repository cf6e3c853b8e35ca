"""Embeddings through the official openai client from a jaxllm server started with `--task embed`."""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key="EMPTY")
model = client.models.list().data[0].id
response = client.embeddings.create(model=model, input=["The capital of France is Paris.", "JAX is a numerical library."])
for item in response.data:
    print(item.index, len(item.embedding), item.embedding[:4])
print(response.usage)
