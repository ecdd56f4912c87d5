"""LocalAI's model-runner protocol: the gRPC `Backend` service, its launcher, option parsing and chat templates."""
