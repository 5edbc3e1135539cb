"""Parley's inference service: vLLM's OpenAI-compatible server, configured by Parley."""
