"""Environment variables apexmtp reads, each read once here, at import (tests patch these constants).

A knob with a value that does not parse never stops a process from starting: it logs a warning naming the variable
and the default, and the default applies. Durations are written the way Go (and so LocalAI) writes them: `500ms`,
`2s`, `1m30s`, `1h`, `300us`; a plain number means seconds.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

# Their InvalidRequestError is a ValueError, so a bad value is a warning and the default like any other knob's.
from .endpoints import parse_endpoints
from .parse import parse_bool
from .units import parse_size

log = logging.getLogger(__name__)
T = TypeVar("T")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (`time.ParseDuration`: `500ms`, `1m30s`, `-1.5h`, `0`) or a plain number of seconds.

    Raises:
        ValueError: not a duration.
    """
    s = text.strip()
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    sign, body = (-1.0, s[1:]) if s.startswith("-") else (1.0, s.removeprefix("+"))
    total, pos = 0.0, 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body) or not math.isfinite(total):
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 2s, 1m30s or a number of seconds)")
    return sign * total


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be longer than zero, got {text.strip()!r}")
    return value


def _path(text: str) -> Path:
    return Path(text.strip()).expanduser()


def knob(name: str, parse: Callable[[str], T], default: T, environ: Mapping[str, str] = os.environ) -> T:
    """`parse(environ[name])`; the default when unset or blank, and (with a logged warning) when it does not parse."""
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        log.warning("ignoring %s=%r: %s; using the default (%s)", name, raw, exc, default)
        return default


# Slots (parallel requests) of a loaded model unless its options say `parallel:N` (LocalAI's llama-cpp knob).
LLAMACPP_PARALLEL: int = knob("LLAMACPP_PARALLEL", _positive_int, 1)

# When set, every RPC must carry `authorization: Bearer <token>` (LocalAI distributed mode).
GRPC_AUTH_TOKEN: str = knob("LOCALAI_GRPC_AUTH_TOKEN", str, "")

# Exit when the parent process (LocalAI) dies, so backends are never orphaned. On by default.
PARENT_WATCH: bool = knob("LOCALAI_BACKEND_PARENT_WATCH", parse_bool, True)
PARENT_WATCH_INTERVAL_S: float = knob("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", _positive_duration, 2.0)

# LocalAI's gRPC client limit (pkg/grpc/client.go): 50 MB each way.
GRPC_MESSAGE_LIMIT: int = 50 * 1024 * 1024

# Where `apexmtp pull`/`run` keep models and their LocalAI YAML configs.
MODELS_DIR: Path = knob("APEXMTP_MODELS_DIR", _path, Path("~/.cache/apexmtp/models").expanduser())

# Where the demo's synthetic models and other generated artefacts are cached.
CACHE_DIR: Path = knob("APEXMTP_CACHE_DIR", _path, Path("~/.cache/apexmtp").expanduser())

# Verbosity of llama.cpp's own log (forwarded to Python logging): 0 warnings and errors, 1 info, 2 debug.
LLAMA_LOG_LEVEL: int = knob("APEXMTP_LLAMA_LOG", _non_negative_int, 0)

# Memory to assume instead of detecting it (`24GiB`; VRAM 0 = no GPU), what `--vram` / `--ram` give per command.
VRAM_OVERRIDE: int | None = knob("APEXMTP_VRAM", parse_size, None)
RAM_OVERRIDE: int | None = knob("APEXMTP_RAM", parse_size, None)

# The GPUs CUDA will show llama.cpp, read as it is: set but empty means none (CUDA's meaning), unset means all.
CUDA_VISIBLE_DEVICES: str | None = os.environ.get("CUDA_VISIBLE_DEVICES")

# API keys `apexmtp run` requires (comma-separated; added to those given with --api-key).
API_KEY: str = knob("APEXMTP_API_KEY", str, "")

# RPC workers (`apexmtp worker`, llama.cpp's rpc-server) every model is split across, `host:port,host:port`, as
# LocalAI's llama-cpp backend reads it; a model's `rpc_servers:` option takes precedence.
RPC_SERVERS: tuple[str, ...] = knob("LLAMACPP_GRPC_SERVERS", parse_endpoints, ())

# How long an RPC worker may take to answer one request (the compute of a long prompt included) before it counts as
# lost; a vanished host is noticed sooner, by TCP keepalive.
RPC_TIMEOUT_S: float = knob("APEXMTP_RPC_TIMEOUT", _positive_duration, 300.0)


def hf_endpoint() -> str | None:
    """HF_ENDPOINT as set now. huggingface_hub reads it once, when it is imported; we pass the endpoint to every
    hub call ourselves, so a process (or test) that sets it later is still followed."""
    return os.environ.get("HF_ENDPOINT") or None
