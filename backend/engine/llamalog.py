"""The one bridge from llama.cpp's log to Python, the one parser of the buffer sizes it logs, and live-object counts.

llama.cpp has a single, process-global log callback. `LLAMA_LOG` installs ours once and keeps it (ctypes must
never free a callback llama.cpp may still call); it forwards lines to the `llama.cpp` Python logger and lets
callers capture what llama.cpp says while a block runs — the only place it reports why a load failed, how
much memory a context took, or what a quantization dry run would write. The backend, the memory measurements
(`gallery.measure`) and the quantizer all read llama.cpp through this module.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import llama_cpp.llama_cpp as L

from ..core import constants

# ggml.h enum ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message)
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5
_PY_LEVELS = {DEBUG: logging.DEBUG, INFO: logging.INFO, WARN: logging.WARNING, ERROR: logging.ERROR}


class LlamaLog:
    """Routes llama.cpp's log to Python logging and hands captured lines to whoever asked for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._captures: list[tuple[int, list[str]]] = []  # (min level, lines) per open capture
        self._partial = ""
        self._level = INFO  # level of the message being continued
        self._cb = L.llama_log_callback(self._on_log)  # kept for the life of the process
        self._installed = False
        self._logger = logging.getLogger("llama.cpp")
        # llama.cpp is chatty at INFO (every load prints ~150 lines): warnings only unless asked for more.
        self._logger.setLevel({0: logging.WARNING, 1: logging.INFO}.get(constants.LLAMA_LOG_LEVEL, logging.DEBUG))

    def install(self) -> None:
        """Make this bridge llama.cpp's log callback (idempotent)."""
        with self._lock:
            if not self._installed:
                L.llama_log_set(self._cb, ctypes.c_void_p(0))
                self._installed = True

    @property
    def callback(self) -> object:
        """The ctypes callback itself, for libraries with a log hook of their own (mtmd) to share."""
        return self._cb

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = (text or b"").decode("utf-8", "replace")
        with self._lock:
            if level != CONT:
                self._level = level
            self._partial += msg
            if not self._partial.endswith("\n"):
                return
            lines, self._partial = self._partial.splitlines(), ""
            level = self._level
            for min_level, sink in self._captures:
                if level >= min_level:
                    sink.extend(lines)
        pylevel = _PY_LEVELS.get(level, logging.DEBUG)
        if pylevel == logging.WARNING and ("unused tensor" in msg or "non-consecutive token position" in msg):
            # expected: MTP tensors when the head is not loaded; an image's M-RoPE positions in recurrent layers
            pylevel = logging.DEBUG
        if self._logger.isEnabledFor(pylevel):
            for line in lines:
                self._logger.log(pylevel, "%s", line)

    @contextmanager
    def capture(self, min_level: int = DEBUG) -> Iterator[list[str]]:
        """Collect llama.cpp's log lines at `min_level` and above while the block runs."""
        self.install()
        entry: tuple[int, list[str]] = (min_level, [])
        with self._lock:
            self._captures.append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:  # by identity: a nested capture's entry can compare equal to this one
                self._captures = [c for c in self._captures if c is not entry]


LLAMA_LOG = LlamaLog()

# llama.cpp objects alive in this process, by kind (model, context, batch, sampler): their owners count them in
# and out, so a lifecycle test (and Status) can see that an unloaded model leaves nothing behind.
LIVE: Counter[str] = Counter()

# "llama_kv_cache: size = ..." (not its "KV buffer size" line, which prints 0.00 under no_alloc), the recurrent
# state, and the per-backend model/compute/output buffers (summed across backends).
_SIZE = re.compile(r"(?P<what>llama_kv_cache|llama_memory_recurrent): size = +(?P<mib>[\d.]+) MiB"
                   r"|(?P<buf>model|compute|output) buffer size = +(?P<mib2>[\d.]+) MiB")
_KIND = {"llama_kv_cache": "kv", "llama_memory_recurrent": "recurrent", "model": "model", "compute": "compute",
         "output": "output"}
MiB = 1024 * 1024


def parse_memory_lines(lines: Iterable[str]) -> dict[str, int]:
    """Bytes per kind — kv, recurrent, model, compute, output — from llama.cpp's buffer-size log lines.

    A kind appears only when llama.cpp logged a line for it. Sizes are logged in MiB with two decimals, so
    each figure is exact to about 5 KiB.
    """
    out: dict[str, int] = {}
    for line in lines:
        for m in _SIZE.finditer(line):
            kind = _KIND[m.group("what") or m.group("buf")]
            out[kind] = out.get(kind, 0) + round(float(m.group("mib") or m.group("mib2")) * MiB)
    return out


# "<buffer type> model|KV|RS|compute|output buffer size = X MiB": one line per buffer, named by its buffer type.
_DEVICE_SIZE = re.compile(r"^\w+: +(?P<buft>\S+) +(?P<kind>model|KV|RS|compute|output) buffer size = +(?P<mib>[\d.]+) MiB")
_DEVICE_KIND = {"model": "model", "KV": "kv", "RS": "recurrent", "compute": "compute", "output": "output"}


def device_of(buffer_type: str) -> str:
    """The device a buffer type's memory is on: every host buffer type (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host) is
    `CPU`; others are the device's own name (CUDA0, RPC0[host:port])."""
    return "CPU" if buffer_type.startswith("CPU") or buffer_type.endswith("_Host") else buffer_type


def parse_device_lines(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """Bytes per device and kind — model, kv, recurrent, compute, output — from llama.cpp's buffer-size lines.

    Under `no_alloc` llama.cpp logs these buffers as 0.00 MiB; `parse_memory_lines` has the totals then.
    """
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        m = _DEVICE_SIZE.match(line.strip())
        if m:
            kinds = out.setdefault(device_of(m.group("buft")), {})
            kind = _DEVICE_KIND[m.group("kind")]
            kinds[kind] = kinds.get(kind, 0) + round(float(m.group("mib")) * MiB)
    return out
