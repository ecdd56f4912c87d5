"""apexmtp backend: a LocalAI model-runner (gRPC) on llama.cpp with MTP self-speculative decoding."""

__version__ = "0.1.0"  # the package version: pyproject.toml reads it from here
