"""Platform adapters: translate platform events into the core's types and delegate."""
