"""`python -m jaxllm.entrypoints.api_server --model MODEL [flags]`: vLLM's simple demo server, whose route
is `POST /generate` ({"prompt", "stream", ...SamplingParams} -> {"text": [...]}). jaxllm serves that
route from the same app as the OpenAI routes, so this is the same server (see `--help`)."""

from jaxllm.entrypoints.launcher import main

if __name__ == "__main__":
    main(prog="python -m jaxllm.entrypoints.api_server")
