"""`python -m jaxllm.serve [--model ...]`: the OpenAI-compatible server (see `--help`)."""

from jaxllm.entrypoints.openai_server import main

if __name__ == "__main__":
    main()
