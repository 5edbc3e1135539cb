"""Chat models behind any OpenAI-compatible server."""
