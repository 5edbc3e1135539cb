"""The conversation domain: standard library only, no platform SDK, no I/O clients."""
