"""`apexmtp run [REF]`: an OpenAI-compatible HTTP API in front of our gRPC backend, started as LocalAI starts it.

The path is LocalAI's: `gallery.pull` resolves REF and writes the model's LocalAI config; the backend is spawned
as `backend/run.sh --addr 127.0.0.1:<port>`, polled with Health and given LoadModel with the options that config
names; every request then goes over gRPC only (PredictStream for streams, Predict otherwise, Embedding).

Layers, innermost first: the pure translation between OpenAI JSON and proto messages (`backend.api.openai_api`), the
backend subprocess (`Backend`), and the HTTP shell (`Handler`, `ApiServer`, `serve`). Responses carry
llama-server's `timings` object, so speculation (`draft_n`, `draft_n_accepted`) is visible.
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
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import grpc

from ..proto import backend_pb2 as pb
from ..proto import backend_pb2_grpc as pb_grpc

from .. import constants
from ..errors import ApexError, EntryNotFoundError, ModelLoadError, NoModelLoadedError
from .openai_api import (
    Job,
    ServedModel,
    StreamFormatter,
    chat_request,
    completion_request,
    completion_response,
    embeddings_request,
    embeddings_response,
    http_error,
    invalid,
)

log = logging.getLogger(__name__)

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"
DEFAULT_PARALLEL = 4  # slots, as llama-server's automatic -np
MAX_BODY = constants.GRPC_MESSAGE_LIMIT  # a request that could not cross the gRPC link is refused at the door


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
    )


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
    """The HTTP client closed its connection; the generation behind it is cancelled."""


class Handler(BaseHTTPRequestHandler):
    """Routes, JSON bodies, SSE streams; every error becomes an OpenAI-style JSON error."""

    protocol_version = "HTTP/1.1"
    server: ApiServer
    ROUTES: ClassVar[dict[str, tuple[str, str]]] = {
        "/health": ("GET", "health"), "/v1/health": ("GET", "health"),
        "/v1/models": ("GET", "models"), "/models": ("GET", "models"),
        "/v1/chat/completions": ("POST", "chat"), "/chat/completions": ("POST", "chat"),
        "/v1/completions": ("POST", "completions"), "/completions": ("POST", "completions"),
        "/v1/embeddings": ("POST", "embeddings"), "/embeddings": ("POST", "embeddings"),
    }

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if method == "GET" and path.startswith("/v1/models/"):
            return self._guard(lambda: self.model_info(unquote(path[len("/v1/models/"):])))
        route = self.ROUTES.get(path)
        if route is None:
            return self._send_error(404, f"no route {method} {path}", "not_found")
        if route[0] != method:
            return self._send_error(405, f"{path} takes {route[0]}, not {method}", "method_not_allowed")
        handler = getattr(self, route[1])
        self._guard(lambda: handler(self._body()) if method == "POST" else handler())

    def _guard(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ClientGone:
            self.close_connection = True
        except Exception as exc:
            status, body = http_error(exc)
            if status >= 500 and not isinstance(exc, (grpc.RpcError, ApexError)):
                log.exception("request failed")
            self._send_json(status, body)

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            raise invalid(None, f"Content-Length must be 0 to {MAX_BODY} bytes, got {self.headers['Content-Length']}")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(None, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise invalid(None, "request body must be a JSON object")
        return body

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_error(self, status: int, message: str, code: str) -> None:
        self.close_connection = True  # a body we did not read would be taken for the next request
        self._send_json(status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": code}})

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
        results = [self._watched(self.server.stub.Embedding.future(r)).result() for r in requests]
        self._send_json(200, embeddings_response(results, model, body.get("encoding_format", "float")))

    # -- generation ----------------------------------------------------------------------------------------

    def _complete(self, job: Job) -> None:
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

    def _stream(self, job: Job, first: pb.Reply | None, replies: Iterator[pb.Reply]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
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
            if exc.code() != grpc.StatusCode.CANCELLED:
                self._event(http_error(exc)[1])  # headers are out: the error travels as an event
            return
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
            log.info("client %s went away mid-stream; cancelling its generation", self.address_string())
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


class ApiServer(ThreadingHTTPServer):
    """The HTTP server; it answers 503 until `attach` gives it a backend with a loaded model."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), Handler)
        self.backend: Backend | None = None
        self.model: ServedModel | None = None
        self.loading = ""
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def stub(self) -> pb_grpc.BackendStub:
        assert self.backend is not None
        return self.backend.stub

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def attach(self, backend: Backend, model: ServedModel) -> None:
        self.backend, self.model = backend, model

    def ready(self, name: str | None = None) -> ServedModel:
        """The served model if it is up and `name` refers to it; raises for 503 (loading, dead) and 404."""
        if self.backend is None or self.model is None:
            raise NoModelLoadedError(f"loading model {self.loading}".rstrip())
        self.backend.check()
        if name is not None and not isinstance(name, str):
            raise invalid("model", "model must be a string")
        if not self.model.matches(name):
            raise EntryNotFoundError(f"model {name!r} is not served here; this server serves {self.model.name!r}")
        return self.model

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            model = self.ready()
        except ApexError as exc:
            return 503, {"status": "unavailable", "error": {"code": 503, "message": str(exc),
                                                            "type": "unavailable_error"}}
        assert self.backend is not None
        return 200, {"status": "ok", "model": model.name,
                     "backend": {"addr": self.backend.addr, "pid": self.backend.proc.pid}}

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
    progress: bool = True
    echo_backend: bool = True


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model arguments `run` and `chat` share."""
    parser.add_argument("ref", nargs="?", help="model: gallery name, owner/repo@Tier, owner/repo@File.gguf, "
                        "hf:// URI, a .gguf path, `demo` (default: SmolLM2, offline) or `demo-mtp`")
    parser.add_argument("--tier", help="force a tier, e.g. I-Balanced (default: the best that fits this machine)")
    parser.add_argument("--context", type=int, help="context of each request, prompt + answer (default: as large as fits)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                        help=f"requests served at once, each with the whole --context (default {DEFAULT_PARALLEL})")
    parser.add_argument("--models-dir", type=Path, help="models directory (default: APEXMTP_MODELS_DIR)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: the backend's choice)")
    parser.add_argument("--embeddings", action="store_true", help="enable /v1/embeddings")
    parser.add_argument("--no-mtp", action="store_true", help="decode without MTP speculation")


def prepare(opts: RunOptions) -> tuple[pb.ModelOptions, ServedModel]:
    """Pull the model (or the embedded demo) and build LoadModel's message from the config pull wrote."""
    import yaml

    from gallery.pull import pull

    from .demo import DEFAULT_DEMO, DEMOS, demo_path, is_demo, merge_options

    models_dir = Path(opts.models_dir or constants.MODELS_DIR).expanduser()
    mtp = False if opts.no_mtp else None
    if is_demo(opts.ref):
        demo = DEMOS[opts.ref or DEFAULT_DEMO]
        pulled = pull(str(demo_path(demo.name)), context=opts.context, models_dir=models_dir, progress=False, mtp=mtp)
        options = merge_options(pulled.options, ("spec_type:none",) if opts.no_mtp else demo.options)
        aliases = {demo.name} | ({"demo"} if demo.name == DEFAULT_DEMO else set())
    else:
        pulled = pull(opts.ref, tier=opts.tier, context=opts.context, models_dir=models_dir,
                      progress=opts.progress, mtp=mtp)
        options, aliases = list(pulled.options), {opts.ref}
    options = merge_options(options, (f"parallel:{opts.parallel}",))
    log.info("%s", pulled.explanation)
    config = yaml.safe_load(pulled.config_path.read_text(encoding="utf-8"))
    config["options"] = options
    load = model_options(config, models_dir, threads=opts.threads, embeddings=opts.embeddings)
    defaults = {k: v for k, v in (config.get("parameters") or {}).items() if k != "model"}
    aliases |= {pulled.model_path.name, pulled.model_path.stem}
    served = ServedModel(name=pulled.name, aliases=frozenset(aliases - {pulled.name}), context_size=load.ContextSize,
                         identity=load.Model, embeddings=load.Embeddings,
                         mtp="spec_type:draft-mtp" in options, defaults=defaults)
    return load, served


def serve(opts: RunOptions) -> ApiServer:
    """Bind the HTTP port, serve (503 while loading), start the backend and load the model. Caller closes it."""
    server = ApiServer(opts.host, opts.port).start()
    server.loading = opts.ref or "demo"
    try:
        load, served = prepare(opts)
        backend = Backend(echo=opts.echo_backend)
        server.backend = backend  # stopped by close() even if loading fails
        backend.wait_healthy()
        message = backend.load(load)
        log.info("backend %s: %s", backend.addr, message)
        server.attach(backend, served)
    except BaseException:
        server.close()
        raise
    return server


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str]) -> int:
    """`apexmtp run [REF] [--port 8080] [--host 127.0.0.1] [--tier T] [--context N] [--embeddings] ...`"""
    parser = argparse.ArgumentParser(prog="apexmtp run", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument("--quiet", action="store_true", help="no download progress, no backend log echo")
    args = parser.parse_args(argv)
    opts = RunOptions(ref=args.ref, host=args.host, port=args.port, tier=args.tier, context=args.context,
                      models_dir=args.models_dir, threads=args.threads, embeddings=args.embeddings,
                      no_mtp=args.no_mtp, parallel=args.parallel, progress=not args.quiet,
                      echo_backend=not args.quiet)
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
              f"MTP {'on' if model.mtp else 'off'}); Ctrl-C stops", file=sys.stderr, flush=True)
        threading.Event().wait()
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
