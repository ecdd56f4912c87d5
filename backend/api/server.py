"""`apexmtp run [REF]`: an OpenAI-compatible HTTP API in front of our gRPC backend, started as LocalAI starts it.

The path is LocalAI's: `gallery.pull` resolves REF and writes the model's LocalAI config; the backend is spawned
as `backend/run.sh --addr 127.0.0.1:<port>`, polled with Health and given LoadModel with the options that config
names; every request then goes over gRPC only (PredictStream for streams, Predict otherwise, Embedding).

Layers, innermost first: the pure translation between OpenAI JSON and proto messages (`backend.api.openai_api`), the
backend subprocess (`Backend`), what the web page shows (`backend.api.webui`), the hardened HTTP server
(`backend.api.httpd`: worker pool, deadlines, API keys) and the HTTP shell (`Handler`, `ApiServer`, `serve`).
Responses carry llama-server's `timings` object, so speculation (`draft_n`, `draft_n_accepted`) is visible.

Besides the OpenAI routes it serves the web page (`GET /`, static files, no build step), `/api/status`,
`/api/gallery`, `/api/pull` (server-sent download progress), `/api/switch` (LoadModel of another model on the
same backend) and `/metrics` (Prometheus text). With API keys every route but `/health` and the page's files needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import grpc

from gallery.catalog import Catalog, load_catalog
from gallery.detect import HardwareProfile, add_workers, detect
from gallery.select import Request

from ..core import constants
from ..core.endpoints import parse_endpoints
from ..core.errors import ApexError, EntryNotFoundError, ModelLoadError, NoModelLoadedError
from ..proto import backend_pb2 as pb
from ..proto import backend_pb2_grpc as pb_grpc
from . import webui
from .httpd import (
    DEFAULT_BACKLOG,
    DEFAULT_WORKERS,
    DeadlineHandler,
    PooledHTTPServer,
    authorized,
    exposure_warning,
    host_allowed,
    parse_keys,
)
from .openai_api import (
    Job,
    ServedModel,
    StreamFormatter,
    chat_request,
    completion_request,
    completion_response,
    embeddings_request,
    embeddings_response,
    error_body,
    http_error,
    invalid,
    is_bug,
)

log = logging.getLogger(__name__)

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"
DEFAULT_PARALLEL = 4  # slots, as llama-server's automatic -np
MAX_BODY = 64 * 1024 * 1024  # room for base64 images; refused with 413 before a byte of the body is read


# ---------------------------------------------------------------------------- the backend subprocess


def _flash(value: Any) -> str:
    # YAML reads a bare `on` as True: map booleans back to the backend's words.
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value or "")


def model_options(config: dict[str, Any], models_dir: Path, *, threads: int = 0,
                  embeddings: bool = False) -> pb.ModelOptions:
    """The LoadModel message LocalAI would build from a model config (`<models>/<name>.yaml`)."""
    model = str(config["parameters"]["model"])
    path = Path(model) if Path(model).is_absolute() else models_dir / model
    return pb.ModelOptions(
        Model=model, ModelFile=str(path), ModelPath=str(models_dir),
        ContextSize=int(config.get("context_size") or 0), NGPULayers=int(config.get("gpu_layers") or 0),
        Threads=threads or int(config.get("threads") or 0), NBatch=int(config.get("batch") or 0),
        MMap=bool(config.get("mmap", True)), MLock=bool(config.get("mlock", False)),
        FlashAttention=_flash(config.get("flash_attention")),
        CacheTypeKey=str(config.get("cache_type_k") or ""), CacheTypeValue=str(config.get("cache_type_v") or ""),
        Options=[str(o) for o in config.get("options") or []],
        Embeddings=embeddings or bool(config.get("embeddings", False)),
        MMProj=_under(str(config["mmproj"]), models_dir) if config.get("mmproj") else "",
    )


def _under(path: str, models_dir: Path) -> str:
    """A config path as LocalAI hands it to a backend: relative ones resolved against the models directory."""
    return path if Path(path).is_absolute() else str(models_dir / path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Backend:
    """The gRPC backend as LocalAI runs it: `run.sh --addr 127.0.0.1:<port>`, Health polled, then LoadModel.

    Its output is read by a thread that echoes it (optionally) and keeps the tail; when the process exits on its
    own, that thread logs the exit with the tail, and `exit_reason` makes every later request fail fast.
    """

    def __init__(self, *, run_sh: Path = RUN_SH, echo: bool = True, env: dict[str, str] | None = None) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.echo = echo
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exit_reason: str | None = None
        self._stopping = False
        # Its own session: a terminal's Ctrl-C reaches us only, and we stop the backend in order.
        self.proc = subprocess.Popen([str(run_sh), "--addr", self.addr], cwd=str(run_sh.parent), env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        limit = constants.GRPC_MESSAGE_LIMIT
        self.channel = grpc.insecure_channel(
            self.addr, options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
        self.stub = pb_grpc.BackendStub(self.channel)
        threading.Thread(target=self._read_output, name="backend-output", daemon=True).start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            if self.echo:
                sys.stderr.write(f"[backend] {line}")
        code = self.proc.wait()
        if not self._stopping:
            self.exit_reason = f"the backend exited with code {code}"
            log.error("%s; its last lines:\n%s", self.exit_reason, "".join(self.tail).rstrip())

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Poll Health until it answers OK (LocalAI's readiness check), failing fast if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ModelLoadError(f"the backend exited with code {self.proc.returncode} before it was ready:\n"
                                     + "".join(self.tail).rstrip())
            try:
                if self.stub.Health(pb.HealthMessage(), timeout=2).message == b"OK":
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise ModelLoadError(f"the backend did not answer Health within {timeout:.0f} s")

    def load(self, options: pb.ModelOptions) -> str:
        """LoadModel; returns the backend's message. Raises ModelLoadError when it fails or the backend dies."""
        try:
            result = self.stub.LoadModel(options)
        except grpc.RpcError as exc:
            raise ModelLoadError(f"LoadModel failed: {exc.details()}\n" + "".join(self.tail).rstrip()) from None
        if not result.success:
            raise ModelLoadError(f"could not load model: {result.message}")
        return result.message

    def check(self) -> None:
        """Raise NoModelLoadedError (HTTP 503) when the backend is gone."""
        if self.exit_reason is not None or self.proc.poll() is not None:
            raise NoModelLoadedError(f"{self.exit_reason or 'the backend exited'}; restart `apexmtp run`")

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """Status and GetMetrics as `webui.backend_view` reads them; raises grpc.RpcError when it does not answer."""
        status = self.stub.Status(pb.HealthMessage(), timeout=timeout)
        return webui.backend_view(status, self.stub.GetMetrics(pb.MetricsRequest(), timeout=timeout))

    def has_model(self) -> bool:
        """Whether the backend holds a loaded model (False when it does not answer)."""
        try:
            return self.stub.Status(pb.HealthMessage(), timeout=5).state != pb.StatusResponse.UNINITIALIZED
        except grpc.RpcError:
            return False

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (LocalAI's shutdown)."""
        self._stopping = True
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------- the HTTP shell


class ClientGone(Exception):
    """The HTTP client closed its connection (or missed a deadline); the work behind it is cancelled."""


class Refusal(Exception):
    """A request refused at the HTTP level, before its body is read or used (411, 413, 403, ...)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


# The web page's own policy: its scripts and styles come from this server only, and nothing it renders may run code.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


class Handler(DeadlineHandler):
    """Routes, JSON bodies, SSE streams; every error becomes an OpenAI-style JSON error."""

    server: ApiServer
    ROUTES: ClassVar[dict[str, tuple[str, str]]] = {
        "/": ("GET", "page"),
        "/health": ("GET", "health"), "/v1/health": ("GET", "health"),
        "/v1/models": ("GET", "models"), "/models": ("GET", "models"),
        "/v1/chat/completions": ("POST", "chat"), "/chat/completions": ("POST", "chat"),
        "/v1/completions": ("POST", "completions"), "/completions": ("POST", "completions"),
        "/v1/embeddings": ("POST", "embeddings"), "/embeddings": ("POST", "embeddings"),
        "/metrics": ("GET", "metrics"),
        "/api/status": ("GET", "status"), "/api/gallery": ("GET", "gallery"),
        "/api/pull": ("POST", "pull"), "/api/switch": ("POST", "switch"),
    }
    PREFIXES: ClassVar[dict[str, tuple[str, str]]] = {"/v1/models/": ("GET", "model_info"),
                                                      "/static/": ("GET", "static")}
    OPEN: ClassVar[frozenset[str]] = frozenset({"page", "static", "health"})  # answered without an API key
    PAGE_ACTIONS: ClassVar[frozenset[str]] = frozenset({"pull", "switch"})  # change state: same-origin JSON only

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        self.head_done()
        self._streaming = False
        host = self.headers.get("Host")
        if not host_allowed(host, self.server.options.host, self.server.keys):
            port = self.server.server_address[1]
            return self._send_error(421, f"this server does not answer for Host {host!r} (DNS rebinding protection): "
                                    f"use http://127.0.0.1:{port}, the address given to --host, or start it with "
                                    "--api-key to accept any host name", "misdirected_request")
        path = urlsplit(self.path).path.rstrip("/") or "/"
        prefix = next((p for p in self.PREFIXES if path.startswith(p)), None)
        route = self.PREFIXES[prefix] if prefix else self.ROUTES.get(path)
        if route is None:
            return self._send_error(404, f"no route {method} {path}", "not_found")
        if route[0] != method:
            return self._send_error(405, f"{path} takes {route[0]}, not {method}", "method_not_allowed")
        if route[1] not in self.OPEN and not authorized(self.headers.get("Authorization"), self.server.keys):
            return self._send_error(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with "
                                    "a key this server was started with (--api-key)", "invalid_api_key",
                                    headers={"WWW-Authenticate": 'Bearer realm="apexmtp"'})
        handler = getattr(self, route[1])
        if method == "POST":
            self._guard(lambda: handler(self._body(page_action=route[1] in self.PAGE_ACTIONS)))
        elif prefix:
            self._guard(lambda: handler(unquote(path[len(prefix):])))
        else:
            self._guard(handler)

    def _guard(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ClientGone:
            self.close_connection = True
        except Refusal as exc:
            self._send_error(exc.status, str(exc), exc.code)
        except Exception as exc:
            status, body = http_error(exc)
            if is_bug(exc):  # ours and the backend's errors explain themselves; anything else is a bug
                log.exception("%s %s failed", self.command, self.path)
            if not self._streaming:
                return self._send_json(status, body)
            try:
                self._event(body)  # headers are out: the error travels as an event
            except ClientGone:
                pass

    def _body(self, page_action: bool = False) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise Refusal(411, "send the body with a Content-Length (chunked uploads are not accepted)",
                          "length_required")
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.isdigit():
            raise Refusal(400, f"Content-Length must be a number of bytes, got {raw_length!r}", "invalid_request")
        length = int(raw_length)
        if length > MAX_BODY:
            raise Refusal(413, f"the request body is {length} bytes; this server accepts at most {MAX_BODY}",
                          "request_too_large")
        if page_action:
            self._same_origin_json()
        raw = self.read_body(length) if length else b""
        if raw is None:
            raise ClientGone()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(None, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise invalid(None, "request body must be a JSON object")
        return body

    def _same_origin_json(self) -> None:
        """Refuse a cross-site request: any web page can POST text to localhost, but not JSON without a preflight."""
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise Refusal(415, "send Content-Type: application/json", "unsupported_media_type")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise Refusal(403, f"requests from {origin} are not accepted; use the page this server serves",
                          "cross_origin")

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send_error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        self.close_connection = True  # a body we did not read would be taken for the next request
        self._send_json(status, error_body(message, "invalid_request_error", code),
                        {"Connection": "close", **(headers or {})})

    # -- the page ------------------------------------------------------------------------------------------

    def page(self) -> None:
        self.static("index.html")

    def static(self, name: str) -> None:
        path = webui.STATIC_DIR / name
        kind = webui.STATIC_TYPES.get(path.suffix)
        if "/" in name or name.startswith(".") or kind is None or not path.is_file():
            return self._send_error(404, f"no file {name!r}", "not_found")
        self._send(200, path.read_bytes(), kind, PAGE_HEADERS)

    def status(self) -> None:
        self._send_json(200, self.server.status_view())

    def metrics(self) -> None:
        text = webui.prometheus_text(self.server.status_view())
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def gallery(self) -> None:
        self._send_json(200, self.server.gallery_view())

    def pull(self, body: dict[str, Any]) -> None:
        job = self.server.pull(_name(body))
        self._start_stream()
        for snapshot in webui.progress_events(job):
            self._event(snapshot)
        self._write(b"data: [DONE]\n\n")

    def switch(self, body: dict[str, Any]) -> None:
        self._send_json(200, self.server.model_card(self.server.switch(_name(body))))

    # -- routes ------------------------------------------------------------------------------------------

    def health(self) -> None:
        self._send_json(*self.server.health())

    def models(self) -> None:
        model = self.server.ready()
        self._send_json(200, {"object": "list", "data": [self.server.model_card(model)]})

    def model_info(self, name: str) -> None:
        self._send_json(200, self.server.model_card(self.server.ready(name)))

    def chat(self, body: dict[str, Any]) -> None:
        model = self.server.ready(body.get("model"))
        self._complete(Job("chat", chat_request(body, model), model, **_stream_flags(body)))

    def completions(self, body: dict[str, Any]) -> None:
        model = self.server.ready(body.get("model"))
        self._complete(Job("text", completion_request(body, model), model, **_stream_flags(body)))

    def embeddings(self, body: dict[str, Any]) -> None:
        model = self.server.ready(body.get("model"))
        if not model.embeddings:
            raise invalid("model", f"{model.name} is served without embeddings: start `apexmtp run --embeddings`")
        requests = embeddings_request(body, model)
        for r in requests:
            _fits_grpc(r)
        results = [self._watched(self.server.stub.Embedding.future(r)).result() for r in requests]
        self._send_json(200, embeddings_response(results, model, body.get("encoding_format", "float")))

    # -- generation ----------------------------------------------------------------------------------------

    def _complete(self, job: Job) -> None:
        _fits_grpc(job.request)
        if not job.stream:
            reply = self._watched(self.server.stub.Predict.future(job.request)).result()
            return self._send_json(200, completion_response(job, reply))
        call = self.server.stub.PredictStream(job.request)
        watch = self._watch(call.cancel)
        try:
            replies = iter(call)
            first = next(replies, None)  # an error before any output still gets a proper HTTP status
            self._stream(job, first, replies)
        finally:
            watch.set()
            call.cancel()  # a no-op once the stream has ended

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        self._streaming = True

    def _stream(self, job: Job, first: pb.Reply | None, replies: Iterator[pb.Reply]) -> None:
        self._start_stream()
        fmt = StreamFormatter(job)
        for chunk in fmt.opening():
            self._event(chunk)
        last = first
        try:
            for reply in _chain(first, replies):
                last = reply
                chunk = fmt.delta(reply)
                if chunk is not None:
                    self._event(chunk)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return  # the client left (the watch cancelled the call) or the server is stopping
            raise
        if last is not None:
            for chunk in fmt.closing(last):
                self._event(chunk)
        self._write(b"data: [DONE]\n\n")

    def _event(self, obj: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            log.info("client %s went away mid-stream; cancelling its work", self.address_string())
            raise ClientGone() from None

    def _watched(self, future: grpc.Future) -> grpc.Future:
        """Wait for a unary call while watching the socket, so a client that leaves cancels it."""
        watch = self._watch(future.cancel)
        try:
            future.result()  # raises the call's error (and CANCELLED if the client left)
        except grpc.FutureCancelledError:
            raise ClientGone() from None
        finally:
            watch.set()
        return future

    def _watch(self, cancel: Callable[[], Any]) -> threading.Event:
        """Call `cancel` if the client closes its connection before the returned event is set."""
        done = threading.Event()
        sock = self.connection

        def run() -> None:
            while not done.is_set():
                try:
                    readable, _, _ = select.select([sock], [], [], 0.2)
                    if readable and not done.is_set():
                        if not sock.recv(1, socket.MSG_PEEK):
                            log.info("client %s disconnected; cancelling", self.address_string())
                            cancel()
                        return  # either gone, or it sent more (a pipelined request): it is still there
                except (OSError, ValueError):
                    if not done.is_set():
                        cancel()
                    return

        threading.Thread(target=run, name="disconnect-watch", daemon=True).start()
        return done


def _chain(first: pb.Reply | None, rest: Iterator[pb.Reply]) -> Iterator[pb.Reply]:
    if first is not None:
        yield first
        yield from rest


def _stream_flags(body: dict[str, Any]) -> dict[str, bool]:
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise invalid("stream_options", "stream_options must be an object")
    return {"stream": bool(body.get("stream")), "include_usage": bool(opts.get("include_usage"))}


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("name", "name must be a gallery entry or demo name")
    return name


def _fits_grpc(request: pb.PredictOptions) -> None:
    """Refuse (413) a request the gRPC link to the backend could not carry, instead of a confusing gRPC error."""
    size = request.ByteSize()
    if size > constants.GRPC_MESSAGE_LIMIT:
        raise Refusal(413, f"the request is {size} bytes as a backend message; the backend link carries at most "
                      f"{constants.GRPC_MESSAGE_LIMIT}", "request_too_large")


class ApiServer(PooledHTTPServer):
    """The HTTP server; it answers 503 until `attach` gives it a backend with a loaded model."""

    allow_reuse_address = True

    def __init__(self, host: str, port: int, *, options: RunOptions | None = None,
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self.options = options or RunOptions(host=host, port=port)
        super().__init__((host, port), Handler, workers=self.options.http_workers, backlog=backlog)
        self.keys = self.options.api_keys
        self.backend: Backend | None = None
        self.model: ServedModel | None = None
        self.loading = ""  # the model being loaded, while one is
        self.load_error = ""  # why no model is served after a failed switch
        self.pulls = webui.Pulls()
        self._thread: threading.Thread | None = None
        self._switch_lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._profile: HardwareProfile | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def stub(self) -> pb_grpc.BackendStub:
        assert self.backend is not None
        return self.backend.stub

    @property
    def catalog(self) -> Catalog:
        """The gallery (`--gallery DIR`, else the packaged one), loaded on first use."""
        if self._catalog is None:
            self._catalog = load_catalog(self.options.gallery)
        return self._catalog

    @property
    def profile(self) -> HardwareProfile:
        """This machine as the selector sees it, detected once (before a model takes its memory), with the RPC
        workers of `--rpc` and the memory they report (`WorkerUnreachableError` naming one that does not answer)."""
        if self._profile is None:
            self._profile = add_workers(detect(), self.options.rpc)
        return self._profile

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def attach(self, backend: Backend, model: ServedModel) -> None:
        self.backend, self.model = backend, model

    def ready(self, name: str | None = None) -> ServedModel:
        """The served model if it is up and `name` refers to it; raises for 503 (loading, dead) and 404."""
        model = self.model
        if self.backend is None or model is None:
            if self.load_error and not self.loading:
                raise NoModelLoadedError(self.load_error)
            raise NoModelLoadedError(f"loading model {self.loading}".rstrip())
        self.backend.check()
        if name is not None and not isinstance(name, str):
            raise invalid("model", "model must be a string")
        if not model.matches(name):
            raise EntryNotFoundError(f"model {name!r} is not served here; this server serves {model.name!r}")
        return model

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            model = self.ready()
        except ApexError as exc:
            return 503, {"status": "unavailable", "error": {"code": 503, "message": str(exc),
                                                            "type": "unavailable_error"}}
        assert self.backend is not None
        return 200, {"status": "ok", "model": model.name,
                     "backend": {"addr": self.backend.addr, "pid": self.backend.proc.pid}}

    def status_view(self) -> dict[str, Any]:
        """What the page's status panel and /metrics show: state, served model, the backend's figures, pulls."""
        try:
            model: ServedModel | None = self.ready()
            state, message = "ready", ""
        except ApexError as exc:
            model, message = None, str(exc)
            state = "loading" if self.loading else "down"
        backend = None
        if self.backend is not None and self.backend.exit_reason is None:
            try:
                backend = dict(self.backend.status(), addr=self.backend.addr, pid=self.backend.proc.pid)
            except grpc.RpcError as exc:
                message = message or f"the backend does not answer Status: {exc.details()}"
        return {
            "state": state, "message": message, "auth": bool(self.keys), "backend": backend,
            "model": None if model is None else {
                "name": model.name, "aliases": sorted(model.aliases), "context_size": model.context_size,
                "mtp": model.mtp, "embeddings": model.embeddings},
            "pulls": self.pulls.snapshots(),
        }

    def gallery_view(self) -> dict[str, Any]:
        view = webui.gallery_view(self.catalog, self.profile, self.options.models_path,
                                  Request(parallel=self.options.parallel))
        model = self.model
        view["serving"] = None if model is None else [model.name, *sorted(model.aliases)]
        return view

    def pull(self, name: str) -> webui.PullJob:
        """Start (or follow) the verified download of gallery tier `name`, as `apexmtp pull NAME` does."""
        from gallery.pull import pull

        entry = self.catalog.get(name)
        if entry.is_hub:
            raise invalid("name", f"{name} is a family: pull one of its tiers ({', '.join(entry.variants)})")
        opts = self.options
        return self.pulls.start(entry, opts.models_path, lambda: pull(
            entry.name, models_dir=opts.models_path, context=opts.context, profile=self.profile, progress=False,
            catalog=self.catalog, mtp=False if opts.no_mtp else None, parallel=opts.parallel))

    def switch(self, ref: str) -> ServedModel:
        """Serve `ref` instead: LoadModel on the same backend with the options `prepare` builds for it.

        Requests in flight on the old model end with 503 (the backend unloads it). If the backend refuses the new
        model before unloading, the old one stays served; otherwise the failure is what /health reports.
        """
        with self._switch_lock:
            backend = self.backend
            if backend is None:
                raise NoModelLoadedError(f"loading model {self.loading}".rstrip())
            backend.check()
            load, served = prepare(replace(self.options, ref=ref, tier=None), profile=self.profile,
                                   catalog=self.catalog)
            old = self.model
            self.model, self.loading, self.load_error = None, served.name, ""
            try:
                message = backend.load(load)
            except ApexError as exc:
                if backend.has_model():
                    self.model = old
                else:
                    self.load_error = f"no model is served: loading {served.name} failed: {exc}"
                raise
            finally:
                self.loading = ""
            log.info("now serving %s: %s", served.name, message)
            self.model = served
            return served

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client resetting its connection is routine; socketserver would print a traceback for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("connection from %s reset", client_address)
            return
        log.exception("error while serving %s", client_address)

    def model_card(self, model: ServedModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": 0, "owned_by": "apexmtp",
                "meta": {"context_size": model.context_size, "mtp": model.mtp, "embeddings": model.embeddings}}

    def close(self) -> None:
        """Stop serving, then stop the backend (in-flight calls end with the channel)."""
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        if self.backend is not None:
            self.backend.stop()


# ---------------------------------------------------------------------------- putting it together


@dataclass(frozen=True)
class RunOptions:
    """What `apexmtp run` (and `apexmtp chat` without --url) was asked for."""

    ref: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    tier: str | None = None
    context: int | None = None
    models_dir: Path | None = None
    threads: int = 0
    embeddings: bool = False
    no_mtp: bool = False
    parallel: int = DEFAULT_PARALLEL
    prefer: str = "quality"
    progress: bool = True
    echo_backend: bool = True
    gallery: Path | None = None  # gallery data directory (default: the packaged gallery)
    api_keys: tuple[str, ...] = ()
    http_workers: int = DEFAULT_WORKERS
    rpc: tuple[str, ...] = ()  # RPC workers (`apexmtp worker`) to split the model across
    mmproj: Path | None = None  # vision projector GGUF; overrides the one the model config names
    cache_options: tuple[str, ...] = ()  # prompt-reuse options from --cache-ram, --prompt-cache, ... (cache_options())

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir or constants.MODELS_DIR).expanduser()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model arguments `run` and `chat` share."""
    parser.add_argument("ref", nargs="?", help="model: gallery name, owner/repo@Tier, owner/repo@File.gguf, "
                        "hf:// URI, a .gguf path, `demo` (default: SmolLM2, offline) or `demo-mtp`")
    parser.add_argument("--tier", help="force a tier, e.g. I-Balanced (default: the best that fits this machine)")
    parser.add_argument("--context", type=int,
                        help="context of each request, prompt + answer (default: as large as fits)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                        help=f"requests served at once, each with the whole --context (default {DEFAULT_PARALLEL})")
    parser.add_argument("--prefer", choices=("quality", "speed"), default="quality",
                        help="tier objective: the best tier fast enough (quality, default) or the fastest good one")
    parser.add_argument("--models-dir", type=Path, help="models directory (default: APEXMTP_MODELS_DIR)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: the backend's choice)")
    parser.add_argument("--embeddings", action="store_true", help="enable /v1/embeddings")
    parser.add_argument("--no-mtp", action="store_true", help="decode without MTP speculation")
    parser.add_argument("--rpc", type=parse_endpoints, default=(), metavar="HOST:PORT,...",
                        help="split the model across these RPC workers (`apexmtp worker` on each host)")
    parser.add_argument("--mmproj", type=Path, metavar="FILE",
                        help="vision projector GGUF (mmproj) for image input (default: the one pull fetched)")
    parser.add_argument("--cache-ram", type=int, metavar="MiB",
                        help="host-RAM cache for the states of slots taken by other prompts (default 8192; 0 off, "
                        "-1 no limit)")
    parser.add_argument("--prompt-cache", type=Path, metavar="DIR",
                        help="keep the states of long prompts in DIR and reuse them after a restart or reload")
    parser.add_argument("--ctx-checkpoints", type=int, metavar="N",
                        help="recurrent-state checkpoints per slot on hybrid models (default 16; 0 off)")
    parser.add_argument("--checkpoint-min-step", type=int, metavar="TOKENS",
                        help="tokens between two mid-prompt checkpoints (default 256)")


def cache_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The backend options (LocalAI's names) that the prompt-reuse flags of `add_run_arguments` set."""
    given = {"cache_ram": args.cache_ram, "ctx_checkpoints": args.ctx_checkpoints,
             "checkpoint_min_step": args.checkpoint_min_step,
             "prompt_cache_dir": args.prompt_cache.expanduser().resolve() if args.prompt_cache else None}
    return tuple(f"{key}:{value}" for key, value in given.items() if value is not None)


def prepare(opts: RunOptions, *, profile: HardwareProfile | None = None,
            catalog: Catalog | None = None) -> tuple[pb.ModelOptions, ServedModel]:
    """Pull the model (or the embedded demo) and build LoadModel's message from the config pull wrote."""
    import yaml

    from gallery.pull import pull

    from .demo import DEFAULT_DEMO, DEMOS, demo_path, is_demo, merge_options

    models_dir = opts.models_path
    mtp = False if opts.no_mtp else None
    if is_demo(opts.ref):
        demo = DEMOS[opts.ref or DEFAULT_DEMO]
        pulled = pull(str(demo_path(demo.name)), context=opts.context, models_dir=models_dir, progress=False, mtp=mtp,
                      profile=profile, catalog=catalog, parallel=opts.parallel)
        options = merge_options(pulled.options, ("spec_type:none",) if opts.no_mtp else demo.options)
        aliases = {demo.name} | ({"demo"} if demo.name == DEFAULT_DEMO else set())
    else:
        pulled = pull(opts.ref, tier=opts.tier, context=opts.context, models_dir=models_dir,
                      progress=opts.progress, mtp=mtp, profile=profile, catalog=catalog, parallel=opts.parallel,
                      prefer=opts.prefer)
        options, aliases = list(pulled.options), {opts.ref}
    options = merge_options(options, (f"parallel:{opts.parallel}",) + ((f"rpc_servers:{','.join(opts.rpc)}",)
                                                                     if opts.rpc else ()) + opts.cache_options)
    log.info("%s", pulled.explanation)
    config = yaml.safe_load(pulled.config_path.read_text(encoding="utf-8"))
    config["options"] = options
    if opts.mmproj is not None:
        config["mmproj"] = str(opts.mmproj.expanduser().resolve())
    load = model_options(config, models_dir, threads=opts.threads, embeddings=opts.embeddings)
    defaults = {k: v for k, v in (config.get("parameters") or {}).items() if k != "model"}
    aliases |= {pulled.model_path.name, pulled.model_path.stem}
    served = ServedModel(name=pulled.name, aliases=frozenset(aliases - {pulled.name}), context_size=load.ContextSize,
                         identity=load.Model, embeddings=load.Embeddings,
                         mtp="spec_type:draft-mtp" in options, defaults=defaults)
    return load, served


def serve(opts: RunOptions) -> ApiServer:
    """Bind the HTTP port, serve (503 while loading), start the backend and load the model. Caller closes it."""
    server = ApiServer(opts.host, opts.port, options=opts).start()
    server.loading = opts.ref or "demo"
    try:
        load, served = prepare(opts, profile=server.profile, catalog=server.catalog)
        backend = Backend(echo=opts.echo_backend)
        server.backend = backend  # stopped by close() even if loading fails
        backend.wait_healthy()
        message = backend.load(load)
        log.info("backend %s: %s", backend.addr, message)
        server.attach(backend, served)
    except BaseException:
        server.close()
        raise
    finally:
        server.loading = ""
    return server


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str]) -> int:
    """`apexmtp run [REF] [--port 8080] [--host 127.0.0.1] [--api-key KEY] [--tier T] [--context N] ...`"""
    parser = argparse.ArgumentParser(prog="apexmtp run", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help="require `Authorization: Bearer KEY` on every route but /health and the page's files; "
                        "repeat it or give a comma-separated list for several keys (also: APEXMTP_API_KEY)")
    parser.add_argument("--gallery", type=Path, metavar="DIR",
                        help="gallery data directory with index.yaml, architectures.yaml, hardware.yaml "
                        "(default: the packaged gallery)")
    parser.add_argument("--http-workers", type=int, default=DEFAULT_WORKERS,
                        help=f"HTTP connections served at once (default {DEFAULT_WORKERS})")
    parser.add_argument("--quiet", action="store_true", help="no download progress, no backend log echo")
    args = parser.parse_args(argv)
    opts = RunOptions(ref=args.ref, host=args.host, port=args.port, tier=args.tier, context=args.context,
                      models_dir=args.models_dir, threads=args.threads, embeddings=args.embeddings,
                      no_mtp=args.no_mtp, parallel=args.parallel, prefer=args.prefer, progress=not args.quiet,
                      echo_backend=not args.quiet, gallery=args.gallery,
                      api_keys=parse_keys([*(args.api_key or []), constants.API_KEY]),
                      http_workers=args.http_workers, rpc=args.rpc, mmproj=args.mmproj,
                      cache_options=cache_options(args))
    warning = exposure_warning(opts.host, opts.api_keys)
    if warning:
        print(f"apexmtp run: warning: {warning}", file=sys.stderr, flush=True)
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops the backend. SIGINT is set too because a shell
    # starts background jobs with it ignored, and Python then never installs its own handler.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    server = None
    try:
        server = serve(opts)
        model = server.model
        assert model is not None
        print(f"apexmtp: serving {model.name} on {server.url}/v1 (context {model.context_size}, "
              f"MTP {'on' if model.mtp else 'off'}); web page: {server.url}/ ; Ctrl-C stops",
              file=sys.stderr, flush=True)
        # Python runs signal handlers in the main thread only, and SIGTERM may be delivered to any of the worker
        # threads: an untimed wait would never see it. Waking twice a second lets the handler run.
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("apexmtp: stopping", file=sys.stderr)
        return 0
    except (ApexError, OSError) as exc:
        print(f"apexmtp run: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()
    return 0
