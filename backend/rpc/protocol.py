"""ggml-rpc's wire format as the pinned llama.cpp speaks it (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7.0.0).

A request is `| cmd (1 byte) | size (u64 LE) | payload |`; the commands in `REPLY_SIZE` are answered with
`| size (u64 LE) | payload |`, the others are not answered at all. A worker serves one client connection at a
time and starts every connection with HELLO. This module knows just enough to probe a worker (version, devices,
memory) before llama.cpp connects to it, and to answer llama.cpp's client for a worker that is gone (`stand_in`).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ..core.endpoints import parse_endpoint
from ..core.errors import WorkerUnreachableError

# ggml-rpc.h of the pinned llama.cpp: a worker must have the same major version and no newer minor one.
PROTO_MAJOR, PROTO_MINOR = 7, 0
CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (transport.h): transport upgrade offers (RDMA) carried in HELLO

# enum rpc_cmd
(ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE, FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, SET_TENSOR_HASH,
 GET_TENSOR, COPY_TENSOR, GRAPH_COMPUTE, GET_DEVICE_MEMORY, INIT_TENSOR, GET_ALLOC_SIZE, HELLO, DEVICE_COUNT,
 GRAPH_RECOMPUTE, MEMSET_TENSOR) = range(18)
N_COMMANDS = 18

# Reply payload size of each answered command (GET_TENSOR's is the `size` its request ends with).
REPLY_SIZE: dict[int, int] = {
    HELLO: 4 + CONN_CAPS, DEVICE_COUNT: 4, ALLOC_BUFFER: 16, GET_ALIGNMENT: 8, GET_MAX_SIZE: 8, BUFFER_GET_BASE: 8,
    SET_TENSOR_HASH: 1, GET_TENSOR: -1, COPY_TENSOR: 1, GET_DEVICE_MEMORY: 16, GET_ALLOC_SIZE: 8,
}

U64 = struct.Struct("<Q")
HEADER = struct.Struct("<BQ")  # cmd, payload size


def reply_size(cmd: int, payload: bytes) -> int | None:
    """Payload size of the reply a request gets, None when it gets none."""
    size = REPLY_SIZE.get(cmd)
    if size == -1:
        return U64.unpack_from(payload, len(payload) - 8)[0]
    return size


def stand_in(cmd: int, payload: bytes) -> bytes:
    """The reply given in place of a lost worker: well formed, so llama.cpp's client never aborts, and harmless.

    Allocations fail (a null buffer), memory reads as zeros, copies and hashed uploads report success, so no
    more data is sent, and sizes are plausible (alignment 64, a non-null base, unlimited max size). What llama.cpp
    computes from these is garbage, which is why the engine fails the request (`WorkerLostError`) instead.
    """
    size = reply_size(cmd, payload)
    if size is None:
        return b""
    if cmd == HELLO:
        body = bytes([PROTO_MAJOR, PROTO_MINOR, 0, 0]) + bytes(CONN_CAPS)
    elif cmd == GET_ALIGNMENT:
        body = U64.pack(64)
    elif cmd == GET_MAX_SIZE:
        body = U64.pack(1 << 62)
    elif cmd == BUFFER_GET_BASE:
        body = U64.pack(4096)  # ggml asserts a buffer base is not NULL
    elif cmd in (SET_TENSOR_HASH, COPY_TENSOR):
        body = b"\x01"
    else:
        body = bytes(size)
    return U64.pack(len(body)) + body


# ----------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reported: its protocol version and each device's memory (bytes)."""

    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[DeviceMemory, ...]

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the worker closed the connection")
        got += k
    return bytes(buf)


def call(sock: socket.socket, cmd: int, payload: bytes = b"") -> bytes:
    """Send one request and return its reply payload (requests in `REPLY_SIZE` only)."""
    sock.sendall(HEADER.pack(cmd, len(payload)) + payload)
    size = U64.unpack(_recv_exact(sock, 8))[0]
    expected = reply_size(cmd, payload)
    if size != expected:
        raise ConnectionError(f"malformed reply to command {cmd}: {size} bytes, {expected} expected")
    return _recv_exact(sock, size)


def probe(endpoint: str, timeout: float) -> WorkerInfo:
    """Ask a worker for its version, devices and their memory over a connection of our own, then close it.

    llama.cpp aborts the process when it cannot connect, and hangs when a worker never answers (it serves one
    client at a time, so a worker busy with another client queues us silently): this runs first, in Python,
    with a timeout.

    Raises:
        WorkerUnreachableError: refused, timed out, busy, or a protocol version this llama.cpp cannot use.
    """
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            try:
                hello = call(sock, HELLO, bytes(CONN_CAPS))
            except TimeoutError:
                raise WorkerUnreachableError(endpoint, f"accepted the connection but did not answer within {timeout:g} s "
                                             "(a worker serves one client at a time: is another backend using "
                                             "it?)") from None
            version = (hello[0], hello[1], hello[2])
            if version[0] != PROTO_MAJOR or version[1] > PROTO_MINOR:
                raise WorkerUnreachableError(endpoint, f"speaks RPC protocol {'.'.join(map(str, version))}; this "
                                             f"llama.cpp needs {PROTO_MAJOR}.x with x <= {PROTO_MINOR} (run a "
                                             "worker built from the same llama.cpp, e.g. `apexmtp worker`)")
            (n_devices,) = struct.unpack("<I", call(sock, DEVICE_COUNT))
            devices = []
            for i in range(n_devices):
                free, total = struct.unpack("<QQ", call(sock, GET_DEVICE_MEMORY, struct.pack("<I", i)))
                devices.append(DeviceMemory(free, total))
    except WorkerUnreachableError:
        raise
    except TimeoutError:
        raise WorkerUnreachableError(endpoint, f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise WorkerUnreachableError(endpoint, exc.strerror or str(exc)) from None
    if not devices:
        raise WorkerUnreachableError(endpoint, "reports no devices")
    return WorkerInfo(endpoint, version, tuple(devices))
