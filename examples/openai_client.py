"""Talk to a running jaxllm server with the official openai client.

    python server.py &                       # serves SmolLM2-135M-Instruct on http://127.0.0.1:8000
    python examples/openai_client.py [BASE_URL]
"""

import sys

from openai import OpenAI


def main(base_url: str = "http://127.0.0.1:8000/v1"):
    client = OpenAI(base_url=base_url, api_key="EMPTY")  # pass the server's --api-key here, if it has one
    model = client.models.list().data[0].id

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                           temperature=0)
    print(completion.choices[0].text)

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    print(chat.choices[0].message.content)

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=24, temperature=0.7, seed=0, stream=True)
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    return completion, chat


if __name__ == "__main__":
    main(*sys.argv[1:])
