"""A relay between llama.cpp's RPC client and one worker, so that losing the worker never kills this process.

Why: in this llama.cpp, every RPC the client sends goes through `rpc_dispatcher::work`, which ends a failed send or
receive with `RPC_STATUS_ASSERT` -> `GGML_ABORT` -> `abort()` (and a failed connect or HELLO aborts as well). A
worker killed mid-generation would take the backend, and every other request and model with it, down. An abort
callback cannot help: `ggml_abort` calls `abort()` after it, and the thread waiting on the dispatcher's
promise could never be released either.

So llama.cpp connects to a `Guard` listening on 127.0.0.1 instead of the worker. Each connection it accepts is
relayed byte for byte to the worker on a connection of its own (the hash cache, the version handshake and every
command pass through unchanged, except that HELLO's transport-upgrade offers are cleared: an upgraded transport
could not be relayed). When the worker side fails — connection refused or reset, end of stream, TCP keepalive
giving up on a vanished host, no reply within the timeout — the guard marks itself lost and from then on answers
every request itself with a well-formed stand-in reply (`protocol.stand_in`). llama.cpp carries on with garbage
numbers instead of aborting; the engine checks `lost` around every decode and fails the requests with
`WorkerLostError`, and the next LoadModel starts over once the worker is back.

One guard per worker lives as long as the process: llama.cpp keys its RPC devices and buffer types (which it
never frees) by endpoint, so the endpoint it sees must stay the same across reloads.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Callable

from ..core.endpoints import parse_endpoint
from .protocol import CONN_CAPS, HEADER, HELLO, N_COMMANDS, U64, reply_size, stand_in

log = logging.getLogger(__name__)

_CHUNK = 4 << 20  # bytes moved per recv/send when streaming a large payload (weights)
_SMALL = 1 << 16  # requests up to this size are read whole (GET_TENSOR's reply size is at their end)


def _tune(sock: socket.socket) -> None:
    """No Nagle delay (llama.cpp's own sockets set TCP_NODELAY); keepalive notices a vanished host in ~15 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _ClientGone(Exception):
    """llama.cpp's side of a relayed connection ended (it closes a connection when it no longer needs it)."""


class _WorkerFailed(Exception):
    """The worker's side failed; `sent` bytes of the reply in progress had already reached llama.cpp."""

    def __init__(self, reason: str, sent: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.sent = reason, sent


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("end of stream")
        got += k


def _from_client(client: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    try:
        _recv_into(client, memoryview(buf))
    except OSError as exc:
        raise _ClientGone() from exc
    return buf


def _to_client(client: socket.socket, data: bytes | bytearray | memoryview) -> None:
    try:
        client.sendall(data)
    except OSError as exc:
        raise _ClientGone() from exc


class Guard:
    """Relays llama.cpp's connections to `endpoint`; after a failure, stands in for it until `reset`."""

    def __init__(self, endpoint: str, *, timeout: float, connect_timeout: float = 5.0,
                 on_lost: Callable[[str, str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.lost: str | None = None  # why the worker was lost, None while it is fine
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._sessions = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.local = f"127.0.0.1:{self._listener.getsockname()[1]}"  # what llama.cpp connects to
        threading.Thread(target=self._accept, name=f"rpc-guard {endpoint}", daemon=True).start()

    # -- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget an earlier loss (a new load probed the worker and found it back)."""
        with self._lock:
            self.lost = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until llama.cpp holds no connection through this guard (an unloaded model's sessions close)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._sessions == 0, timeout)

    def _lose(self, reason: str) -> None:
        with self._lock:
            first = self.lost is None
            if first:
                self.lost = reason
        if first:
            log.error("RPC worker %s lost: %s; requests on its model fail until the model is loaded again",
                      self.endpoint, reason)
            if self._on_lost is not None:
                self._on_lost(self.endpoint, reason)

    # -- relaying ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sessions += 1
            threading.Thread(target=self._session, args=(client,), name=f"rpc-relay {self.endpoint}",
                             daemon=True).start()

    def _session(self, client: socket.socket) -> None:
        worker = self._connect()
        try:
            while True:
                worker = self._relay_one(client, worker)
        except _ClientGone:
            pass
        finally:
            client.close()
            if worker is not None:
                worker.close()
            with self._idle:
                self._sessions -= 1
                self._idle.notify_all()

    def _connect(self) -> socket.socket | None:
        if self.lost is not None:
            return None
        try:
            sock = socket.create_connection(parse_endpoint(self.endpoint), timeout=self.connect_timeout)
        except OSError as exc:
            self._lose(f"cannot connect: {exc.strerror or exc}")
            return None
        _tune(sock)
        sock.settimeout(self.timeout)
        return sock

    def _relay_one(self, client: socket.socket, worker: socket.socket | None) -> socket.socket | None:
        """Relay one request and its reply; returns the worker connection to go on with (None once lost)."""
        if worker is not None and not self._wait_request(client, worker):
            self._fail(worker, "the worker closed the connection")
            worker = None
        head = _from_client(client, HEADER.size)
        cmd, size = HEADER.unpack(head)
        if cmd >= N_COMMANDS:
            log.error("RPC relay for %s: unknown command %d from llama.cpp", self.endpoint, cmd)
            raise _ClientGone()
        # Requests with a reply are small; large ones (tensor data, graphs) are streamed and never answered.
        payload = _from_client(client, size) if size <= _SMALL else None
        if cmd == HELLO and payload is not None:
            payload[:CONN_CAPS] = bytes(CONN_CAPS)  # no transport upgrade: it could not be relayed
        want = reply_size(cmd, bytes(payload)) if payload is not None else None
        try:
            if worker is not None:
                self._send(worker, head)
                if payload is not None:
                    self._send(worker, payload)
                else:
                    self._stream(client, worker, size)
            elif payload is None:
                self._stream(client, None, size)
            if want is not None and worker is not None:
                self._forward_reply(client, worker, cmd, want)
                return worker
        except _WorkerFailed as exc:
            self._fail(worker, exc.reason)
            if want is not None and payload is not None:
                _to_client(client, stand_in(cmd, bytes(payload))[exc.sent:])
            return None
        if want is not None and payload is not None:
            _to_client(client, stand_in(cmd, bytes(payload)))
        return worker

    def _fail(self, worker: socket.socket | None, reason: str) -> None:
        if worker is not None:
            worker.close()
        self._lose(reason)

    def _send(self, worker: socket.socket, data: bytes | bytearray | memoryview) -> None:
        try:
            worker.sendall(data)
        except OSError as exc:
            raise _WorkerFailed(f"sending failed: {exc.strerror or exc}") from exc

    def _recv(self, worker: socket.socket, view: memoryview, sent: int) -> None:
        try:
            _recv_into(worker, view)
        except TimeoutError:
            raise _WorkerFailed(f"no reply within {self.timeout:g} s", sent) from None
        except OSError as exc:
            raise _WorkerFailed(f"receiving failed: {exc.strerror or exc}", sent) from exc

    @staticmethod
    def _wait_request(client: socket.socket, worker: socket.socket) -> bool:
        """Block until llama.cpp sends; False if the worker's side ended while idle (it never speaks unasked)."""
        poller = select.poll()  # one syscall per wait; select() would fail on descriptors above 1024
        poller.register(client, select.POLLIN)
        poller.register(worker, select.POLLIN)
        return all(fd != worker.fileno() for fd, _ in poller.poll())

    def _stream(self, client: socket.socket, worker: socket.socket | None, size: int) -> None:
        """Move a large payload from llama.cpp to the worker (or nowhere, once lost). If the worker fails part
        way, the rest is still read, so llama.cpp's side stays in step, before `_WorkerFailed` is raised."""
        buf = memoryview(bytearray(min(size, _CHUNK)))
        failed: _WorkerFailed | None = None
        left = size
        while left:
            try:
                n = client.recv_into(buf[:min(left, len(buf))])
            except OSError as exc:
                raise _ClientGone() from exc
            if n == 0:
                raise _ClientGone()
            if worker is not None and failed is None:
                try:
                    self._send(worker, buf[:n])
                except _WorkerFailed as exc:
                    failed = exc
            left -= n
        if failed is not None:
            raise failed

    def _forward_reply(self, client: socket.socket, worker: socket.socket, cmd: int, want: int) -> None:
        """Relay the worker's reply of `want` payload bytes as it arrives."""
        head = bytearray(8)
        self._recv(worker, memoryview(head), 0)
        size = U64.unpack(head)[0]
        if size != want:
            raise _WorkerFailed(f"a reply of {size} bytes to command {cmd}, {want} expected")
        if cmd == HELLO:  # small: clear the worker's transport offers as well
            body = bytearray(size)
            self._recv(worker, memoryview(body), 0)
            body[4:] = bytes(CONN_CAPS)
            _to_client(client, head + body)
            return
        _to_client(client, head)
        sent = 8
        buf = memoryview(bytearray(min(max(size, 1), _CHUNK)))
        while sent < size + 8:
            n = min(size + 8 - sent, len(buf))
            self._recv(worker, buf[:n], sent)
            _to_client(client, buf[:n])
            sent += n
