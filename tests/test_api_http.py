"""The HTTP front of `apexmtp run` made safe to expose, in-process on 127.0.0.1 over real sockets: API keys, the body
limit, the bounded worker pool, slow-client deadlines, the exposure warning and the logging of bugs.

No model is loaded: every check here happens before a request reaches the backend (a /v1 route that gets past
them answers 503 "loading", which is how these tests tell "accepted" from "refused").
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_until

from backend.api import httpd
from backend.api.handler import MAX_BODY, ApiServer
from backend.api.httpd import authorized, exposure_warning, parse_keys
from backend.api.models import RunOptions

KEYS = ("k1", "k2")


@pytest.fixture()
def server():
    s = ApiServer("127.0.0.1", 0, options=RunOptions(port=0, api_keys=KEYS, http_workers=2), backlog=1).start()
    yield s
    s.close()


def call(server: ApiServer, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw(server: ApiServer, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


BEARER = {"Authorization": "Bearer k2"}


# ------------------------------------------------------------------------------------------ API keys


def test_parse_keys_and_constant_time_compare(monkeypatch):
    assert parse_keys(["a,b", " c ", None, "", "a"]) == ("a", "b", "c")
    assert authorized(None, ()) and authorized("anything", ())
    assert authorized("Bearer k2", KEYS) and authorized("bearer  k1 ", KEYS)
    assert not authorized(None, KEYS) and not authorized("Bearer k3", KEYS) and not authorized("Basic k1", KEYS)
    assert not authorized("Bearer k", KEYS) and not authorized("Bearer k1k", KEYS)
    calls = []
    real = httpd.hmac.compare_digest
    monkeypatch.setattr(httpd.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    assert authorized("Bearer k1", KEYS)
    assert calls == [b"k1", b"k2"]  # every key is compared, even after a match: no timing hint


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/v1/models/demo", "/api/status", "/api/gallery",
                                  "/metrics"])
def test_every_route_needs_the_key(server, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        status, head, body = call(server, "GET", path, headers)
        assert status == 401 and head["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert call(server, "GET", path, BEARER)[0] != 401


def test_health_and_the_page_stay_open(server):
    assert call(server, "GET", "/health")[0] == 503  # open, and honest: no model loaded yet
    status, head, body = call(server, "GET", "/")
    assert status == 200 and head["Content-Type"].startswith("text/html") and b"/static/app.js" in body
    assert "script-src 'self'" in head["Content-Security-Policy"]
    assert call(server, "GET", "/static/app.js")[0] == 200
    assert call(server, "GET", "/static/../server.py")[0] == 404
    assert call(server, "GET", "/static/nope.js")[0] == 404


def test_a_post_without_the_key_is_refused_before_its_body(server):
    reply = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 401 ")


# ------------------------------------------------------------------------------------------ bodies


def test_an_oversized_body_is_413_before_it_is_read(server):
    # This used to be answered 400 ("Content-Length must be 0 to ..."): the status now says what happened.
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
            f"Content-Length: {MAX_BODY + 1}")
    t0 = time.monotonic()
    reply = raw(server, head.encode() + b"\r\n\r\n", timeout=60)  # no body is sent: the answer must not wait for one
    # Waiting for the body would take BODY_GRACE_S (30 s) and more; a busy machine answers well within 20.
    assert reply.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in reply and time.monotonic() - t0 < 20
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    # With Expect: 100-continue the client learns it before uploading anything (no "100 Continue" first).
    reply = raw(server, head.encode() + b"\r\nExpect: 100-continue\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert call(server, "POST", "/v1/chat/completions", BEARER, b"{}")[0] == 503  # a body within the limit goes on to the route


def test_body_framing_errors(server):
    chunked = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ")
    status, _, body = call(server, "POST", "/v1/completions", {**BEARER, "Content-Length": "-5"})
    assert status == 400 and b"Content-Length" in body
    status, _, body = call(server, "POST", "/v1/completions", BEARER, b"{not json")
    assert status == 400 and b"not valid JSON" in body


def test_page_actions_take_same_origin_json_only(server):
    body = json.dumps({"name": "demo"}).encode()
    assert call(server, "POST", "/api/switch", {**BEARER, "Content-Type": "text/plain"}, body)[0] == 415
    evil = {**BEARER, "Content-Type": "application/json", "Origin": "http://evil.example"}
    assert call(server, "POST", "/api/switch", evil, body)[0] == 403
    host = "{}:{}".format(*server.server_address[:2])
    ours = {**BEARER, "Content-Type": "application/json", "Origin": f"http://{host}"}
    assert call(server, "POST", "/api/switch", ours, body)[0] == 503  # accepted; no backend to switch yet


# ------------------------------------------------------------------------------------------ pool and deadlines


def test_the_worker_pool_is_bounded(server):
    # 2 workers and 1 waiting place: two silent connections hold the workers, a third waits, a fourth is refused.
    idle = [socket.create_connection(server.server_address[:2]) for _ in range(3)]
    try:
        wait_until(lambda: server.connections == 3, 30, 0.01, message="the server did not take the 3 connections")
        reply = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"server_busy" in reply
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: server.connections == 0, 30, 0.01, message="closed connections still hold the workers")
    assert call(server, "GET", "/health")[0] == 503  # served again ("loading"), not refused
    assert json.loads(call(server, "GET", "/health")[2])["status"] == "unavailable"


def test_slow_clients_are_disconnected(server, monkeypatch):
    # The deadlines are 0.5 s; the client would wait 60. A close well before that is the server's deadline, however
    # busy the machine.
    server.head_timeout = 0.5
    t0 = time.monotonic()
    assert raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n", timeout=60) == b""  # the head never ends: closed
    assert 0.4 < time.monotonic() - t0 < 30
    monkeypatch.setattr(httpd, "BODY_GRACE_S", 0.5)
    t0 = time.monotonic()
    reply = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"prompt\"", timeout=60)  # 10 of 1000 bytes, then silence
    assert reply == b"" and time.monotonic() - t0 < 30
    # A kept-alive connection that goes quiet is closed too, so idle clients cannot hold the workers: reading until
    # the server closes it gets the one answer, then the end.
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 503 ") and data.count(b"HTTP/1.1") == 1
    assert call(server, "GET", "/health")[0] == 503  # the workers are free


# ------------------------------------------------------------------------------------------ errors and warnings


def test_a_bug_in_a_handler_is_a_500_with_one_traceback(server, caplog):
    def broken() -> dict:
        return {}["missing"]  # a KeyError: this used to be answered 404 model_not_found, and logged nowhere

    server.manager.status_view = broken
    with caplog.at_level(logging.ERROR, logger="backend.api.handler"):
        status, _, body = call(server, "GET", "/api/status", BEARER)
    error = json.loads(body)["error"]
    assert status == 500 and error["type"] == "server_error" and "KeyError" in error["message"]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is KeyError


def test_exposure_warning():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert exposure_warning(host, ()) is None
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "myhost"):
        assert "without an API key" in exposure_warning(host, ())
        assert exposure_warning(host, ("k",)) is None


@pytest.mark.parametrize("keys, warned", [((), True), (("--api-key", "k"), False)])
def test_run_warns_before_listening_beyond_loopback(tmp_path, keys, warned):
    # 203.0.113.1 (TEST-NET-3) is not an address of this machine: the bind fails, after the warning.
    cmd = [sys.executable, "-m", "backend.cli", "run", str(tmp_path / "m.gguf"), "--host", "203.0.113.1",
           "--port", "0", *keys]
    env = {k: v for k, v in os.environ.items() if k != "APEXMTP_API_KEY"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert ("warning: listening on 203.0.113.1 without an API key" in done.stderr) == warned
