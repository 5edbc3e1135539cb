"""The knowledge base: documents read, split into passages, embedded and searched."""
