"""Serving entry points: the OpenAI-compatible HTTP server (`openai_server`) and the asyncio engine driver."""
