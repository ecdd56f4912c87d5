"""Helpers shared by the bench scripts: machine description and robust timing."""

from __future__ import annotations

import os
import platform
import statistics


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
    except Exception:
        ram = "RAM unknown"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {ram}, {platform.system()} {platform.release()}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
