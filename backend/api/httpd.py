"""The HTTP server under `apexmtp run`, safe to expose: a bounded worker pool, slow-client deadlines, API keys.

* **Bounded pool.** `workers` daemon threads serve connections; at most `backlog` more wait for one. A connection
  beyond that gets an immediate 503 written without a worker, so a flood grows neither threads nor memory.
* **Slow clients.** The request head (request line + headers, and the idle wait between keep-alive requests) must
  arrive within `head_timeout`; every later read or write may stall at most `io_timeout`; a body must arrive at
  `MIN_BODY_RATE` or better after a grace period. A client that misses a deadline is disconnected.
* **API keys.** `authorized` compares a `Bearer` token with every configured key in constant time.
* **DNS rebinding.** Without a key, `host_allowed` answers only requests whose Host is a loopback name or the
  address the server was started on; others get 421 Misdirected Request.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from .openai_api import error_body

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 64  # connections served at once (each streaming answer holds one for its whole length)
DEFAULT_BACKLOG = 64  # accepted connections that may wait for a worker
HEAD_TIMEOUT_S = 30.0  # request line + headers, including the idle wait on a kept-alive connection
IO_TIMEOUT_S = 60.0  # longest stall of any single read or write after the head
BODY_GRACE_S = 30.0
MIN_BODY_RATE = 1 << 20  # bytes/s a body must average beyond the grace period (64 MiB: 30 s + 64 s)


def parse_keys(values: Iterable[str | None]) -> tuple[str, ...]:
    """API keys from `--api-key` values and APEXMTP_API_KEY: comma-separated lists, blanks dropped, order kept."""
    keys: list[str] = []
    for value in values:
        for key in (value or "").split(","):
            key = key.strip()
            if key and key not in keys:
                keys.append(key)
    return tuple(keys)


def authorized(header: str | None, keys: tuple[str, ...]) -> bool:
    """True when no key is configured, or `header` is `Bearer <one of keys>` (compared in constant time)."""
    if not keys:
        return True
    scheme, _, token = (header or "").strip().partition(" ")
    given = token.strip().encode()
    # Every key is compared (no early exit), so the time taken says nothing about which key came close.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matches)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for all-interfaces and names."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host part of a Host header or `--host` value, lower-cased: `[::1]:8080` -> `::1`, `localhost:80` ->
    `localhost`, a bare IPv6 address as it is, a trailing dot dropped."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


def host_allowed(header: str | None, bound: str, keys: tuple[str, ...]) -> bool:
    """The DNS-rebinding guard: may a request naming `header` as its Host be answered by a server started on
    `bound` (`--host`) with API `keys`?

    A web page whose own name the attacker re-points at this machine reaches it with that name in the Host header,
    so without a key only names that cannot be anyone else's are answered: loopback names and addresses
    (`localhost`, 127.0.0.0/8, `[::1]`, any port) and the exact `--host` value. The machine's other names and
    addresses are not: a page can be served under any of them too. With a key any Host is answered (a rebound page
    does not have the key). A request without a Host (HTTP/1.0 tools; no browser sends one) is answered.
    """
    if keys or not header:
        return True
    name = host_name(header)
    return is_loopback(name) or (bool(name) and name == host_name(bound))


def exposure_warning(host: str, keys: tuple[str, ...]) -> str | None:
    """The warning to print when `host` is reachable from other machines and no API key protects it."""
    if keys or is_loopback(host):
        return None
    return (f"listening on {host or 'all interfaces'} without an API key: anyone who can reach this port can use "
            "the model, pull gallery models and switch the served one; pass --api-key KEY (or set APEXMTP_API_KEY)")


class PooledHTTPServer(HTTPServer):
    """An HTTPServer whose connections are served by a fixed pool of daemon threads (see the module doc)."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 workers: int = DEFAULT_WORKERS, backlog: int = DEFAULT_BACKLOG,
                 head_timeout: float = HEAD_TIMEOUT_S) -> None:
        if workers < 1 or backlog < 0:
            raise ValueError(f"workers must be >= 1 and backlog >= 0, got {workers} and {backlog}")
        self.workers, self.backlog, self.head_timeout = workers, backlog, head_timeout
        self._capacity = threading.BoundedSemaphore(workers + backlog)
        self._held, self._held_lock = 0, threading.Lock()
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        super().__init__(address, handler)
        for i in range(workers):
            threading.Thread(target=self._work, name=f"http-{i}", daemon=True).start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        if not self._capacity.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        self._hold(1)
        self._queue.put((request, client_address))

    def _hold(self, n: int) -> None:
        with self._held_lock:
            self._held += n

    @property
    def connections(self) -> int:
        """Connections being served or waiting for a worker now (at most `workers + backlog`)."""
        return self._held

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - what socketserver does: report it, keep the worker alive
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._hold(-1)
                self._capacity.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        log.warning("refusing %s: %d connections served and %d waiting", client_address, self.workers, self.backlog)
        body = json.dumps(error_body(f"server busy: {self.workers} connections are being served and {self.backlog} "
                                     "are waiting; try again shortly", "unavailable_error", "server_busy")).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        for _ in range(self.workers):
            self._queue.put(None)


class DeadlineHandler(BaseHTTPRequestHandler):
    """A request handler that enforces the head deadline and the I/O stall limit (see the module doc).

    Subclasses call `head_done()` once the head is parsed, and read bodies with `read_body`.
    """

    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT_S  # socketserver applies it to the connection: every read and write
    server: PooledHTTPServer

    def handle_one_request(self) -> None:
        self.expect_continue = False
        timer = threading.Timer(self.server.head_timeout, self._head_expired)
        timer.daemon = True
        self._head_timer = timer
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def head_done(self) -> None:
        self._head_timer.cancel()

    def _head_expired(self) -> None:
        # The handler thread is blocked reading the head; shutting the socket down makes that read return.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        # Answered by `read_body`, after the route, the key and the size were checked: a refused upload never starts.
        self.expect_continue = True
        return True

    def read_body(self, length: int) -> bytes | None:
        """`length` bytes of body, or None when the client stalled, went too slow, or left (the connection closes)."""
        if self.expect_continue:
            self.send_response_only(100)
            self.end_headers()
        deadline = BODY_GRACE_S + length / MIN_BODY_RATE
        timer = threading.Timer(deadline, self._head_expired)
        timer.daemon = True
        timer.start()
        chunks, have = [], 0
        try:
            while have < length:
                chunk = self.rfile.read1(min(length - have, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                have += len(chunk)
        except OSError:
            pass
        finally:
            timer.cancel()
        if have < length:
            log.info("client %s sent %d of %d body bytes in time; closing", self.address_string(), have, length)
            self.close_connection = True
            return None
        return b"".join(chunks)
