"""Helpers shared by the bench scripts: machine description and robust timing."""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
from collections.abc import Iterator
from typing import Any


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = "RAM unknown"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {ram}, {platform.system()} {platform.release()}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def sse_completion(port: int, body: dict[str, Any], timeout: float = 900) -> Iterator[dict[str, Any]]:
    """POST a streamed /v1/completions to 127.0.0.1:`port` and yield each server-sent JSON chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        for line in resp:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])
    finally:
        conn.close()
