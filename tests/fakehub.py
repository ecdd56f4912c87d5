"""A local stand-in for the Hugging Face Hub: the routes huggingface_hub 2.4 calls, served on 127.0.0.1.

Point `HF_ENDPOINT` at `FakeHub.url` and the real client code runs against it (hf-hub-local.md lists the routes and
headers the client needs). Files are served inline from `/resolve/` with `X-Repo-Commit` and the sha256 as ETag
(LFS-style), honouring `Range: bytes=N-`. Knobs for failure tests: `cut_after` (drop the connection after N body
bytes, once), `throttle` (slow transfer so a client can be killed mid-way), `serve_instead` (send other bytes than
the advertised sha256). Every request is logged with its Range header and the body bytes actually sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

# huggingface_hub reads HF_ENDPOINT once, at import: import it here, before any test points HF_ENDPOINT at a
# FakeHub, so a later test never inherits a stale fake endpoint.
import huggingface_hub  # noqa: F401

COMMIT = "c0ffee" + "0" * 34


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0


@dataclass
class FakeHub:
    """Repos as `{repo: {path: bytes}}`; start() serves them until stop()."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> drop the connection after N body bytes (once)
    throttle: tuple[int, float] | None = None  # (bytes per write, seconds between writes)
    serve_instead: dict[str, bytes] = field(default_factory=dict)  # path -> body sent instead of the real bytes
    log: list[Logged] = field(default_factory=list)

    def start(self) -> Self:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        # shutdown() waits, without a timeout, for serve_forever to notice; a teardown must not hang a CI run on it
        # (seen once in a full run), so it is asked from a helper thread and the serving thread is joined with one.
        threading.Thread(target=self._server.shutdown, daemon=True).start()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            warnings.warn("FakeHub: the serving thread did not stop within 10 s", stacklevel=2)
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def sha256(self, repo: str, path: str) -> str:
        return hashlib.sha256(self.repos[repo][path]).hexdigest()

    def gets(self, path_suffix: str) -> list[Logged]:
        """Logged GETs of files whose URL path ends with `path_suffix`."""
        return [r for r in self.log if r.method == "GET" and r.path.endswith(path_suffix)]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+))?/?$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _entry(self) -> Logged:
        entry = Logged(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"))
        self.fake.log.append(entry)
        return entry

    def _send(self, entry: Logged, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            if k != "Content-Length":
                self.send_header(k, v)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            entry.sent = len(body)

    def _not_found(self, entry: Logged, code: str) -> None:
        self._send(entry, 404, {"X-Error-Code": code, "X-Repo-Commit": COMMIT, "Content-Type": "application/json"},
                   json.dumps({"error": code}).encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        entry = self._entry()
        m = _RESOLVE.match(entry.path)
        if m:
            return self._resolve(entry, m.group(1), m.group(3))
        m = _API.match(entry.path)
        if m:
            return self._api(entry, m.group(1), m.group(2))
        self._not_found(entry, "RepoNotFound")

    def do_POST(self) -> None:
        entry = self._entry()
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        m = _API.match(entry.path)
        if not m or m.group(1) not in self.fake.repos:
            return self._not_found(entry, "RepoNotFound")
        files = self.fake.repos[m.group(1)]
        rows = [self._tree_row(m.group(1), p) for p in form.get("paths", []) if p in files]
        self._send(entry, 200, {"Content-Type": "application/json"}, json.dumps(rows).encode())

    # ---------------------------------------------------------------------------------------------- routes

    def _resolve(self, entry: Logged, repo: str, path: str) -> None:
        files = self.fake.repos.get(repo)
        if files is None:
            return self._not_found(entry, "RepoNotFound")
        if path not in files:
            return self._not_found(entry, "EntryNotFound")
        data = files[path]
        body = self.fake.serve_instead.get(path, data)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        rng = re.match(r"bytes=(\d+)-$", entry.range or "")
        status = 200
        if rng and self.command == "GET":
            start, status = int(rng.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if self.command == "HEAD":
            return self._send(entry, 200, dict(headers, **{"Content-Length": str(len(data))}))
        self._stream(entry, status, headers, body[start:], path)

    def _stream(self, entry: Logged, status: int, headers: dict[str, str], body: bytes, path: str) -> None:
        entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.fake.cut_after.pop(path, None)
        step, pause = self.fake.throttle or (1 << 20, 0.0)
        sent = 0
        try:
            while sent < len(body):
                n = min(step, len(body) - sent, (cut - sent) if cut is not None else len(body))
                self.wfile.write(body[sent:sent + n])
                self.wfile.flush()
                sent += n
                entry.sent = sent
                if cut is not None and sent >= cut:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _tree_row(self, repo: str, path: str) -> dict[str, object]:
        data = self.fake.repos[repo][path]
        sha = hashlib.sha256(data).hexdigest()
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return {"type": "file", "oid": oid, "size": len(data), "path": path,
                "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}}

    def _api(self, entry: Logged, repo: str, route: str | None) -> None:
        files = self.fake.repos.get(repo)
        if files is None:
            return self._not_found(entry, "RepoNotFound")
        if route == "tree":
            rows = [self._tree_row(repo, p) for p in sorted(files)]
            return self._send(entry, 200, {"Content-Type": "application/json"}, json.dumps(rows).encode())
        siblings = []
        for p in sorted(files):
            row = self._tree_row(repo, p)
            siblings.append({"rfilename": p, "size": row["size"], "blobId": row["oid"],
                             "lfs": {"sha256": row["lfs"]["oid"], "size": row["size"], "pointerSize": 134}})
        info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "disabled": False, "gated": False,
                "lastModified": "2026-11-01T00:00:00.000Z", "tags": ["gguf"], "siblings": siblings}
        self._send(entry, 200, {"Content-Type": "application/json"}, json.dumps(info).encode())
