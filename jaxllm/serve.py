"""`python -m jaxllm.serve [--model ...]`: the OpenAI-compatible server (see `--help`)."""

from jaxllm.entrypoints.launcher import main

if __name__ == "__main__":
    main(prog="python -m jaxllm.serve")
