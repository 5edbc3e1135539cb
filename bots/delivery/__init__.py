"""Platform-agnostic delivery: a stream of reply text becomes send/edit/split operations."""
