"""jaxllm"""
