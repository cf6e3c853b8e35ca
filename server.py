"""`python server.py [--model DIR|FILE] [--port 8000] ...`: jaxllm's OpenAI-compatible server (see `--help`)."""

from jaxllm.entrypoints.launcher import main

if __name__ == "__main__":
    main()
