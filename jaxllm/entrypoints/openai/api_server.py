"""`python -m jaxllm.entrypoints.openai.api_server --model MODEL [flags]`: the OpenAI-compatible server,
as vLLM's module of the same path (the same flags as `jaxllm serve`; see `--help`)."""

from jaxllm.entrypoints.launcher import main

if __name__ == "__main__":
    main(prog="python -m jaxllm.entrypoints.openai.api_server")
