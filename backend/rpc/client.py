"""The engine's side of RPC: probe the workers, register them with llama.cpp behind guards, and check for losses.

Order matters, because llama.cpp aborts on a worker it cannot reach: every worker is probed directly first
(`protocol.probe`, with a timeout), and only then does llama.cpp see an endpoint — always a `Guard`'s, never the
worker's (see `guard` for why).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from dataclasses import dataclass

import llama_cpp.llama_cpp as L

from ..core import constants, ggml
from ..core.errors import InvalidRequestError, WorkerLostError, WorkerUnreachableError
from .guard import Guard
from .protocol import WorkerInfo, probe

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # a worker that has not answered HELLO by then is unreachable or serving someone else
_IDLE_TIMEOUT_S = 10.0  # how long the previous model's relayed connections may take to close

_guards: dict[str, Guard] = {}
_guards_lock = threading.Lock()


def guard_for(endpoint: str) -> Guard:
    """The process's guard for `endpoint` (created on first use, kept for good: llama.cpp keys its devices by the
    endpoint it was given, and never frees them)."""
    with _guards_lock:
        if endpoint not in _guards:
            _guards[endpoint] = Guard(endpoint, timeout=constants.RPC_TIMEOUT_S)
        return _guards[endpoint]


def query_workers(endpoints: tuple[str, ...], timeout: float = PROBE_TIMEOUT_S) -> list[WorkerInfo]:
    """Each worker's devices and their free/total memory, asked over RPC (`protocol.probe`) in the order given.

    This is the check LoadModel makes before llama.cpp sees an endpoint, so planning (`apexmtp hw --rpc`) and
    loading agree on what the workers offer. Pure Python with a timeout per worker: never hangs, never aborts.

    Raises:
        WorkerUnreachableError: a worker refused, timed out, is busy with another client or speaks another
            protocol version; the message names it.
    """
    return [probe(ep, timeout) for ep in endpoints]


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """`"3,1"` or `"3/1"` (llama.cpp's `--tensor-split`) -> (3.0, 1.0): the proportion of layers per device.

    Raises:
        InvalidRequestError: a part is not a non-negative number, or all are zero.
    """
    parts = [p for p in re.split(r"[,/]", text.strip()) if p.strip()]
    try:
        split = tuple(float(p) for p in parts)
    except ValueError:
        raise InvalidRequestError(f"tensor_split {text!r} is not a list of numbers such as 3,1") from None
    if not split or any(x < 0 for x in split) or not any(split):
        raise InvalidRequestError(f"tensor_split {text!r}: give one non-negative proportion per device, not all 0")
    if len(split) > L.LLAMA_MAX_DEVICES:
        raise InvalidRequestError(f"tensor_split has {len(split)} parts; llama.cpp takes at most {L.LLAMA_MAX_DEVICES}")
    return split


def split_array(split: tuple[float, ...]) -> ctypes.Array:
    """`llama_model_params.tensor_split`: llama.cpp reads one float per device it uses, out of LLAMA_MAX_DEVICES."""
    return (ctypes.c_float * L.LLAMA_MAX_DEVICES)(*split)


@dataclass(frozen=True)
class Device:
    """One device a model may be split across: a worker's (endpoint set) or a local GPU."""

    handle: int
    name: str  # as Status and the estimate show it: RPC<i>[host:port] for a worker's, else ggml's name
    free: int
    total: int
    endpoint: str = ""


class Workers:
    """The RPC workers one engine uses: their guards, devices (theirs first, then local GPUs) and loss check."""

    def __init__(self, endpoints: tuple[str, ...]) -> None:
        ggml.rpc_library()  # a build without RPC fails here, with the rebuild command, before anything connects
        self.guards = [guard_for(ep) for ep in endpoints]
        for g in self.guards:
            if not g.wait_idle(_IDLE_TIMEOUT_S):
                raise WorkerUnreachableError(g.endpoint, "still busy with the previous model's connections")
        self.infos = query_workers(endpoints)
        devices: list[Device] = []
        # buffer-name prefix llama.cpp logs for a worker's device -> the name we show
        self._names: dict[str, str] = {}
        for g, info in zip(self.guards, self.infos):
            g.reset()
            handles = ggml.add_server(g.local)
            if len(handles) != len(info.devices):
                raise WorkerUnreachableError(g.endpoint, g.lost or "its devices changed while registering")
            for i, (h, mem) in enumerate(zip(handles, info.devices)):
                shown = f"RPC{i}[{g.endpoint}]"
                self._names[f"RPC{i}[{g.local}]"] = shown
                devices.append(Device(h, shown, mem.free, mem.total, g.endpoint))
        for h in ggml.offload_devices():
            free, total = ggml.memory(h)
            devices.append(Device(h, ggml.name(h), free, total))
        self.devices = tuple(devices)
        self._array = (ctypes.c_void_p * (len(devices) + 1))(*(d.handle for d in devices), None)
        log.info("RPC: splitting across %s", ", ".join(f"{d.name} ({d.free / 2**30:.1f} GiB free)" for d in devices))

    @property
    def devices_pointer(self) -> ctypes.c_void_p:
        """`llama_model_params.devices`: the NULL-terminated device array (alive as long as this object)."""
        return ctypes.cast(self._array, ctypes.c_void_p)

    def tensor_split(self, split: tuple[float, ...]) -> ctypes.Array:
        """`llama_model_params.tensor_split` for one proportion per device, in `devices` order."""
        if len(split) != len(self.devices):
            raise InvalidRequestError(f"tensor_split has {len(split)} parts for {len(self.devices)} devices "
                                      f"({', '.join(d.name for d in self.devices)})")
        return split_array(split)

    def device_name(self, buffer: str) -> str:
        """The name to show for a buffer llama.cpp logged (`RPC0[127.0.0.1:<guard port>]` -> the worker's)."""
        return self._names.get(buffer, buffer)

    def check(self) -> None:
        """Raise `WorkerLostError` if any worker was lost: what llama.cpp computed since is garbage."""
        for g in self.guards:
            if g.lost is not None:
                raise WorkerLostError(g.endpoint, g.lost)

    @property
    def lost(self) -> list[str]:
        return [g.endpoint for g in self.guards if g.lost is not None]
