"""vLLM's quickstart client, with `vllm` changed to `jaxllm`. Start the server first:

    jaxllm serve                                   # SmolLM2-135M-Instruct; or: jaxllm serve ORG/NAME | PATH
    python examples/quickstart_client.py [BASE_URL]
"""

import sys

from openai import OpenAI

# The server's --api-key, if it has one; anything when it has none.
openai_api_key = "EMPTY"
openai_api_base = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8000/v1"

client = OpenAI(api_key=openai_api_key, base_url=openai_api_base)
model = client.models.list().data[0].id

completion = client.completions.create(model=model, prompt="San Francisco is a")
print("Completion result:", completion)

chat_response = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a joke."},
    ],
)
print("Chat response:", chat_response)
