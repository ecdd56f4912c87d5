"""Environment variables apexmtp reads, each read once here (tests patch these constants)."""

from __future__ import annotations

import os
from pathlib import Path


def _is_true(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _as_int(value: str | None, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


# Slots (parallel requests) of a loaded model unless its options say `parallel:N` (LocalAI's llama-cpp knob).
LLAMACPP_PARALLEL: int = max(1, _as_int(os.environ.get("LLAMACPP_PARALLEL"), 1))

# When set, every RPC must carry `authorization: Bearer <token>` (LocalAI distributed mode).
GRPC_AUTH_TOKEN: str = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")

# Exit when the parent process (LocalAI) dies, so backends are never orphaned. On by default.
PARENT_WATCH: bool = _is_true(os.environ.get("LOCALAI_BACKEND_PARENT_WATCH"), default=True)
PARENT_WATCH_INTERVAL_S: float = float((os.environ.get("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL") or "2s").rstrip("s") or 2)

# LocalAI's gRPC client limit (pkg/grpc/client.go): 50 MB each way.
GRPC_MESSAGE_LIMIT: int = 50 * 1024 * 1024

# Where `apexmtp pull`/`run` keep models and their LocalAI YAML configs.
MODELS_DIR: Path = Path(os.path.expanduser(os.environ.get("APEXMTP_MODELS_DIR", "~/.cache/apexmtp/models")))

# Where the demo's synthetic models and other generated artefacts are cached.
CACHE_DIR: Path = Path(os.path.expanduser(os.environ.get("APEXMTP_CACHE_DIR", "~/.cache/apexmtp")))

# Verbosity of llama.cpp's own log (forwarded to Python logging): 0 warnings and errors, 1 info, 2 debug.
LLAMA_LOG_LEVEL: int = _as_int(os.environ.get("APEXMTP_LLAMA_LOG"), 0)

# API keys `apexmtp run` requires (comma-separated; added to those given with --api-key).
API_KEY: str = os.environ.get("APEXMTP_API_KEY", "")
