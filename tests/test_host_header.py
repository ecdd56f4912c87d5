"""The DNS-rebinding guard of `apexmtp run`'s HTTP front, in-process over real sockets: without an API key only
loopback Host names and the `--host` value are answered, anything else is 421 with an OpenAI-shaped error; with a
key any Host is answered (the key protects).

No model is loaded: /health answers 503 "loading" once a request is past the guard, which is how these tests tell
"answered" from "refused".
"""

from __future__ import annotations

import http.client
import json

import pytest

from backend.api.handler import ApiServer
from backend.api.httpd import host_allowed, host_name
from backend.api.models import RunOptions


def serve(host: str = "127.0.0.1", keys: tuple[str, ...] = ()) -> ApiServer:
    return ApiServer(host, 0, options=RunOptions(host=host, port=0, api_keys=keys, http_workers=2)).start()


@pytest.fixture(scope="module")
def local():
    s = serve()
    yield s
    s.close()


def send(server: ApiServer, host: str | None, method: str = "GET", path: str = "/health",
         headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request with exactly `host` as its Host header (none when None; a browser always sends one, so only
    tools do), to the server's loopback port."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for key, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            conn.putheader(key, value)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_host_names_are_parsed_without_port_brackets_or_case():
    assert host_name("[::1]:8080") == "::1" and host_name("[::1]") == "::1" and host_name("::1") == "::1"
    assert host_name("LocalHost:80") == "localhost" and host_name("localhost.") == "localhost"
    assert host_name("127.0.0.1:8080") == "127.0.0.1" and host_name(" 0.0.0.0 ") == "0.0.0.0"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "127.8.9.10:{port}", "localhost:{port}",
                                  "LOCALHOST", "localhost.:{port}", "[::1]:{port}", "[::1]", None, ""])
def test_loopback_hosts_are_answered(local, host):
    status, _, _ = send(local, host and host.format(port=local.server_address[1]))
    assert status == 503  # past the guard: /health says no model is loaded yet


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1.evil.example", "0.0.0.0:{port}", "192.168.1.5:{port}"])
def test_other_hosts_are_421_with_an_openai_error(local, host):
    status, head, body = send(local, host.format(port=local.server_address[1]))
    assert status == 421 and head["Content-Type"] == "application/json" and head["Connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "misdirected_request"
    assert "DNS rebinding" in error["message"] and "--api-key" in error["message"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/v1/models"),
                                              ("GET", "/nope"), ("POST", "/api/pull"),
                                              ("POST", "/v1/chat/completions")])
def test_every_route_is_guarded(local, method, path):
    body = b"{}" if method == "POST" else b""
    headers = {"Content-Type": "application/json"} if method == "POST" else {}
    assert send(local, "rebound.example", method, path, headers, body)[0] == 421
    assert send(local, "localhost", method, path, headers, body)[0] != 421


def test_the_host_value_is_answered_and_the_machines_other_names_are_not():
    server = serve("0.0.0.0")
    try:
        port = server.server_address[1]
        assert send(server, f"0.0.0.0:{port}")[0] == 503
        assert send(server, f"localhost:{port}")[0] == 503
        for other in ("myhost.lan", f"192.168.1.5:{port}", "evil.example"):
            assert send(server, other)[0] == 421, other
    finally:
        server.close()


def test_with_an_api_key_any_host_is_answered():
    server = serve(keys=("k1",))
    try:
        assert send(server, "evil.example")[0] == 503  # /health is open, and the Host is not checked
        assert send(server, "evil.example", path="/v1/models")[0] == 401  # the key is what protects
        assert send(server, "evil.example", path="/v1/models", headers={"Authorization": "Bearer k1"})[0] == 503
    finally:
        server.close()


def test_host_allowed_rules():
    assert host_allowed("myhost.lan:8080", "myhost.lan", ()) and host_allowed("MyHost.LAN", "myhost.lan", ())
    assert host_allowed("[::1]:1", "::", ()) and host_allowed("[::]:8080", "::", ())
    assert not host_allowed("other.lan", "myhost.lan", ()) and not host_allowed("x", "", ())
    assert host_allowed("anything", "127.0.0.1", ("k",)) and host_allowed(None, "127.0.0.1", ())
