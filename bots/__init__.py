"""Parley's chat bots: platform adapters around one conversation core."""
