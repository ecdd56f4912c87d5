"""`apexmtp run`: an OpenAI-compatible HTTP API over the gRPC backend, the offline demos and `apexmtp chat`."""
