"""Conversation context kept in Redis."""
