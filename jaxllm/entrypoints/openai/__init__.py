"""vLLM's module path for the OpenAI-compatible server: `python -m jaxllm.entrypoints.openai.api_server`."""
