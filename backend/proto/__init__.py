"""Generated gRPC stubs for LocalAI's `backend.Backend` service (source: the repository's proto/backend.proto)."""
