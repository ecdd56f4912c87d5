"""The HTTP shell of `apexmtp run`: the routes (`Handler`) and the server that runs them (`ApiServer`).

Every request goes to the backend over gRPC only (PredictStream for streams, Predict otherwise, Embedding), built
and answered by the pure translation in `backend.api.openai_api`; the model behind it is the `ModelManager`'s.
Responses carry llama-server's `timings` object, so speculation (`draft_n`, `draft_n_accepted`) is visible. The
hardened server underneath (worker pool, deadlines, API keys) is `backend.api.httpd`.

Besides the OpenAI routes it serves the web page (`GET /`, static files, no build step), `/api/status`,
`/api/gallery`, `/api/pull` (server-sent download progress), `/api/switch` (LoadModel of another model on the
same backend) and `/metrics` (Prometheus text). With API keys every route but `/health` and the page's files needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import grpc

from ..core import constants
from ..core.errors import (
    CrossOriginError,
    LengthRequiredError,
    MethodNotAllowedError,
    MisdirectedRequestError,
    RequestRefusedError,
    RequestTooLargeError,
    RouteNotFoundError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from ..proto import backend_pb2 as pb
from . import webui
from .httpd import DEFAULT_BACKLOG, DeadlineHandler, PooledHTTPServer, authorized, host_allowed
from .models import ModelManager, RunOptions
from .openai_api import (
    BODY_PARAM,
    Job,
    ServedModel,
    StreamFormatter,
    body_params,
    chat_request,
    completion_request,
    completion_response,
    embeddings_request,
    embeddings_response,
    http_error,
    invalid,
    is_bug,
    rerank_request,
    rerank_response,
)

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # room for base64 images; refused with 413 before a byte of the body is read


class ClientGone(Exception):
    """The HTTP client closed its connection (or missed a deadline); the work behind it is cancelled."""


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
        "/v1/rerank": ("POST", "rerank"), "/rerank": ("POST", "rerank"),
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
        self._params = BODY_PARAM  # what the backend's field names mean in this request's body (`body_params`)
        self._guard(lambda: self._route(method))

    def _route(self, method: str) -> None:
        host = self.headers.get("Host")
        if not host_allowed(host, self.server.options.host, self.server.keys):
            port = self.server.server_address[1]
            raise MisdirectedRequestError(f"this server does not answer for Host {host!r} (DNS rebinding protection): "
                                          f"use http://127.0.0.1:{port}, the address given to --host, or start it "
                                          "with --api-key to accept any host name")
        path = urlsplit(self.path).path.rstrip("/") or "/"
        prefix = next((p for p in self.PREFIXES if path.startswith(p)), None)
        route = self.PREFIXES[prefix] if prefix else self.ROUTES.get(path)
        if route is None:
            raise RouteNotFoundError(f"no route {method} {path}")
        if route[0] != method:
            raise MethodNotAllowedError(f"{path} takes {route[0]}, not {method}")
        if route[1] not in self.OPEN and not authorized(self.headers.get("Authorization"), self.server.keys):
            raise UnauthorizedError("missing or wrong API key: send the header `Authorization: Bearer KEY` with a key "
                                    "this server was started with (--api-key)")
        handler = getattr(self, route[1])
        if method == "POST":
            handler(self._body(page_action=route[1] in self.PAGE_ACTIONS))
        elif prefix:
            handler(unquote(path[len(prefix):]))
        else:
            handler()

    def _guard(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ClientGone:
            self.close_connection = True
        except Exception as exc:  # every error gets its HTTP answer; a bug also its logged traceback
            status, body = http_error(exc, self._params)
            if is_bug(exc):  # ours and the backend's errors explain themselves; anything else is a bug
                log.exception("%s %s failed", self.command, self.path)
            headers = {}
            if isinstance(exc, RequestRefusedError):
                self.close_connection = True  # a body we did not read would be taken for the next request
                headers["Connection"] = "close"
            if isinstance(exc, UnauthorizedError):
                headers["WWW-Authenticate"] = 'Bearer realm="apexmtp"'
            if not self._streaming:
                return self._send_json(status, body, headers)
            try:
                self._event(body)  # headers are out: the error travels as an event
            except ClientGone:
                pass

    def _body(self, page_action: bool = False) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise LengthRequiredError("send the body with a Content-Length (chunked uploads are not accepted)")
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.isdigit():
            raise RequestRefusedError(f"Content-Length must be a number of bytes, got {raw_length!r}")
        length = int(raw_length)
        if length > MAX_BODY:
            raise RequestTooLargeError(f"the request body is {length} bytes; this server accepts at most {MAX_BODY}")
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
            raise UnsupportedMediaTypeError("send Content-Type: application/json")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise CrossOriginError(f"requests from {origin} are not accepted; use the page this server serves")

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

    # -- the page ------------------------------------------------------------------------------------------

    def page(self) -> None:
        self.static("index.html")

    def static(self, name: str) -> None:
        path = webui.STATIC_DIR / name
        kind = webui.STATIC_TYPES.get(path.suffix)
        if "/" in name or name.startswith(".") or kind is None or not path.is_file():
            raise RouteNotFoundError(f"no file {name!r}")
        self._send(200, path.read_bytes(), kind, PAGE_HEADERS)

    def status(self) -> None:
        self._send_json(200, self.server.manager.status_view())

    def metrics(self) -> None:
        text = webui.prometheus_text(self.server.manager.status_view())
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def gallery(self) -> None:
        self._send_json(200, self.server.manager.gallery_view())

    def pull(self, body: dict[str, Any]) -> None:
        job = self.server.manager.pull(_name(body))
        self._start_stream()
        for snapshot in webui.progress_events(job):
            self._event(snapshot)
        self._write(b"data: [DONE]\n\n")

    def switch(self, body: dict[str, Any]) -> None:
        self._send_json(200, model_card(self.server.manager.switch(_name(body))))

    # -- routes ------------------------------------------------------------------------------------------

    def health(self) -> None:
        self._send_json(*self.server.manager.health())

    def models(self) -> None:
        model = self.server.manager.ready()
        self._send_json(200, {"object": "list", "data": [model_card(model)]})

    def model_info(self, name: str) -> None:
        self._send_json(200, model_card(self.server.manager.ready(name)))

    def chat(self, body: dict[str, Any]) -> None:
        model = self.server.manager.ready(body.get("model"))
        self._complete(Job("chat", chat_request(body, model), model, body_params("chat", body), **_stream_flags(body)))

    def completions(self, body: dict[str, Any]) -> None:
        model = self.server.manager.ready(body.get("model"))
        self._complete(Job("text", completion_request(body, model), model, body_params("text", body),
                           **_stream_flags(body)))

    def embeddings(self, body: dict[str, Any]) -> None:
        model = self.server.manager.ready(body.get("model"))
        requests = embeddings_request(body, model)
        for r in requests:
            _fits_grpc(r)
        results = [self._watched(self.server.manager.stub.Embedding.future(r)).result() for r in requests]
        self._send_json(200, embeddings_response(results, model, body.get("encoding_format", "float")))

    def rerank(self, body: dict[str, Any]) -> None:
        model = self.server.manager.ready(body.get("model"))
        request = rerank_request(body)
        _fits_grpc(request)
        result = self._watched(self.server.manager.stub.Rerank.future(request)).result()
        self._send_json(200, rerank_response(result, model))

    # -- generation ----------------------------------------------------------------------------------------

    def _complete(self, job: Job) -> None:
        self._params = job.params
        _fits_grpc(job.request)
        if not job.stream:
            reply = self._watched(self.server.manager.stub.Predict.future(job.request)).result()
            return self._send_json(200, completion_response(job, reply))
        call = self.server.manager.stub.PredictStream(job.request)
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


def _fits_grpc(request: pb.PredictOptions | pb.RerankRequest) -> None:
    """Refuse (413) a request the gRPC link to the backend could not carry, instead of a confusing gRPC error."""
    size = request.ByteSize()
    if size > constants.GRPC_MESSAGE_LIMIT:
        raise RequestTooLargeError(f"the request is {size} bytes as a backend message; the backend link carries at "
                                   f"most {constants.GRPC_MESSAGE_LIMIT}")

def model_card(model: ServedModel) -> dict[str, Any]:
    """The served model as an entry of OpenAI's /v1/models."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "apexmtp",
            "meta": {"context_size": model.context_size, "mtp": model.mtp, "embeddings": model.embeddings,
                     "reranking": model.reranking}}


class ApiServer(PooledHTTPServer):
    """The HTTP server; it answers 503 until its `manager` serves a model (`ModelManager.start` or `attach`)."""

    allow_reuse_address = True

    def __init__(self, host: str, port: int, *, options: RunOptions | None = None,
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self.options = options or RunOptions(host=host, port=port)
        super().__init__((host, port), Handler, workers=self.options.http_workers, backlog=backlog)
        self.keys = self.options.api_keys
        self.manager = ModelManager(self.options)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client resetting its connection is routine; socketserver would print a traceback for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("connection from %s reset", client_address)
            return
        log.exception("error while serving %s", client_address)

    def close(self) -> None:
        """Stop serving, then stop the backend (in-flight calls end with the channel)."""
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        self.manager.close()

