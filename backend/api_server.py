"""`apexmtp run [REF]`: an OpenAI-compatible HTTP API in front of our gRPC backend, started as LocalAI starts it.

The path is LocalAI's: `gallery.pull` resolves REF and writes the model's LocalAI config; the backend is spawned
as `backend/run.sh --addr 127.0.0.1:<port>`, polled with Health and given LoadModel with the options that config
names; every request then goes over gRPC only (PredictStream for streams, Predict otherwise, Embedding).

Three layers, outermost last: pure translation between OpenAI JSON and the proto messages (`chat_request`,
`chat_response`, ...), the backend subprocess (`Backend`), and the HTTP shell (`Handler`, `ApiServer`, `serve`).
Responses carry llama-server's `timings` object, so speculation (`draft_n`, `draft_n_accepted`) is visible.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import logging
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

import grpc

from proto import backend_pb2 as pb
from proto import backend_pb2_grpc as pb_grpc

from . import constants
from .errors import (ApexError, ContextOverflowError, EntryNotFoundError, InvalidRequestError, ModelLoadError,
                     NoModelLoadedError)

log = logging.getLogger(__name__)

RUN_SH = Path(__file__).resolve().parent / "run.sh"
MAX_BODY = constants.GRPC_MESSAGE_LIMIT  # a request that could not cross the gRPC link is refused at the door
INT32_MAX = 2**31 - 1

# Request defaults below the model config's `parameters` and the request itself (llama-server's defaults).
DEFAULT_SAMPLING: dict[str, float] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
# OpenAI (and llama-server) body key -> (PredictOptions field, type).
SAMPLING_FIELDS: dict[str, tuple[str, type]] = {
    "temperature": ("Temperature", float),
    "top_p": ("TopP", float),
    "top_k": ("TopK", int),
    "min_p": ("MinP", float),
    "presence_penalty": ("PresencePenalty", float),
    "frequency_penalty": ("FrequencyPenalty", float),
    "repeat_penalty": ("Penalty", float),
    "repeat_last_n": ("Repeat", int),
}
# The backend's gRPC status -> (HTTP status, OpenAI error type); anything else is a 500 server_error.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "unavailable_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "unavailable_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "invalid_request_error"),
}


# ------------------------------------------------------------------------------- the model being served


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer knows about the loaded model: names, limits and request defaults."""

    name: str
    aliases: frozenset[str]  # other names a request may use for it (the REF, file name, "demo")
    context_size: int
    identity: str  # ModelOptions.Model, echoed as PredictOptions.ModelIdentity as LocalAI does
    embeddings: bool
    mtp: bool
    defaults: dict[str, Any] = field(default_factory=dict)  # the config's `parameters` (temperature, top_k...)

    def matches(self, name: str | None) -> bool:
        return not name or name == self.name or name in self.aliases


def _flash(value: Any) -> str:
    # YAML reads a bare `on` as True: map booleans back to the backend's words.
    return {True: "on", False: "off"}.get(value, str(value or "")) if isinstance(value, bool) else str(value or "")


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


# ---------------------------------------------------------------------------- OpenAI JSON -> PredictOptions


def _invalid(param: str | None, message: str) -> InvalidRequestError:
    err = InvalidRequestError(message)
    err.param = param  # OpenAI errors name the offending field
    return err


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise _invalid(key, f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop", "stop must be a string or an array of strings")
    return [s for s in stops if s]


def generation_fields(body: dict[str, Any], model: ServedModel) -> dict[str, Any]:
    """PredictOptions fields shared by chat and text completions: sampling, length, stop, seed."""
    given = {k: v for k, v in body.items() if v is not None}
    merged = {**DEFAULT_SAMPLING, **model.defaults, **given}
    fields: dict[str, Any] = {}
    for key, (name, kind) in SAMPLING_FIELDS.items():
        value = _number(merged, key, kind)
        if value is not None:
            fields[name] = value
    key = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    max_tokens = _number({**model.defaults, **given}, key, int)
    if max_tokens is not None and max_tokens <= 0:
        raise _invalid(key, f"{key} must be at least 1, got {max_tokens}")
    # No limit means "until the context is full": the backend clamps to what the context has left.
    fields["Tokens"] = min(max_tokens or model.context_size, INT32_MAX)
    seed = _number(merged, "seed", int)
    if seed is not None and seed > INT32_MAX:
        raise _invalid("seed", f"seed must be at most {INT32_MAX}, got {seed}")
    if seed is not None and seed >= 0:
        # On the wire 0 means "unset" (random); a client asking for seed 0 wants it fixed, so send another constant.
        fields["Seed"] = seed or INT32_MAX
    if _number(given, "n", int) not in (None, 1):
        raise _invalid("n", "only n=1 is supported")
    fields["StopPrompts"] = _stop(given.get("stop"))
    fields["IgnoreEOS"] = bool(given.get("ignore_eos", False))
    if not isinstance(given.get("grammar", ""), str):
        raise _invalid("grammar", "grammar must be a GBNF string")
    fields["Grammar"] = given.get("grammar", "")
    return fields


def _content_text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"messages[{index}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _invalid(f"messages[{index}].content", "content must be a string or an array of text parts")


def _message(m: Any, index: int) -> pb.Message:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _invalid(f"messages[{index}]", "each message must be an object with a string role")
    calls = m.get("tool_calls")
    return pb.Message(
        role=m["role"], content=_content_text(m.get("content"), index), name=str(m.get("name") or ""),
        tool_call_id=str(m.get("tool_call_id") or ""), reasoning_content=str(m.get("reasoning_content") or ""),
        tool_calls=json.dumps(calls) if calls else "",
    )


def _chat_metadata(body: dict[str, Any]) -> dict[str, str]:
    """The chat-template switches LocalAI passes as Metadata (thinking on/off, reasoning effort, extra kwargs)."""
    meta: dict[str, str] = {}
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise _invalid("chat_template_kwargs", "chat_template_kwargs must be an object")
        meta["chat_template_kwargs"] = json.dumps(kwargs)
    if body.get("enable_thinking") is not None:
        meta["enable_thinking"] = "true" if body["enable_thinking"] else "false"
    if body.get("reasoning_effort"):
        meta["reasoning_effort"] = str(body["reasoning_effort"])
    return meta


def chat_request(body: dict[str, Any], model: ServedModel) -> pb.PredictOptions:
    """`/v1/chat/completions` body -> PredictOptions (the backend renders the GGUF's chat template)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty array")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _invalid("response_format", "only response_format {\"type\": \"text\"} is supported (use grammar)")
    top = _number(body, "top_logprobs", int)
    if top is not None and not body.get("logprobs"):
        raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise _invalid("tools", "tools must be an array")
    if choice == "none":
        tools = None  # the model must not call tools: do not show it any
    return pb.PredictOptions(
        Messages=[_message(m, i) for i, m in enumerate(messages)], UseTokenizerTemplate=True,
        Tools=json.dumps(tools) if tools else "",
        ToolChoice=(choice if isinstance(choice, str) else json.dumps(choice)) if choice is not None else "",
        Logprobs=1 if body.get("logprobs") else 0, TopLogprobs=top or 0,
        Metadata=_chat_metadata(body), ModelIdentity=model.identity, **generation_fields(body, model),
    )


def completion_request(body: dict[str, Any], model: ServedModel) -> pb.PredictOptions:
    """`/v1/completions` body -> PredictOptions (the prompt goes to the model verbatim)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _invalid("prompt", "prompt must be a non-empty string (or an array holding one)")
    if body.get("echo") or body.get("suffix"):
        raise _invalid("echo" if body.get("echo") else "suffix", "echo and suffix are not supported")
    top = _number(body, "logprobs", int)
    if top is not None and not 0 <= top <= 20:
        raise _invalid("logprobs", f"logprobs must be between 0 and 20, got {top}")
    return pb.PredictOptions(Prompt=prompt, Logprobs=1 if top is not None else 0, TopLogprobs=top or 0,
                             ModelIdentity=model.identity, **generation_fields(body, model))


# ---------------------------------------------------------------------------- Reply -> OpenAI JSON


def timings(reply: pb.Reply) -> dict[str, float | int]:
    """llama-server's `timings` object from a final Reply.

    The backend's generation time runs from the first token to the last, so the rate counts the n-1 tokens after
    the first one (the first token's cost is in `prompt_ms`, as in llama-server).
    """
    pn, gn = reply.prompt_tokens, reply.tokens
    pms, gms = reply.timing_prompt_processing, reply.timing_token_generation
    steps = max(gn - 1, 0)
    return {
        "prompt_n": pn, "prompt_ms": pms,
        "prompt_per_token_ms": pms / pn if pn else 0.0, "prompt_per_second": 1000.0 * pn / pms if pms > 0 else 0.0,
        "predicted_n": gn, "predicted_ms": gms,
        "predicted_per_token_ms": gms / steps if steps else 0.0,
        "predicted_per_second": 1000.0 * steps / gms if gms > 0 else 0.0,
        "draft_n": reply.draft_n, "draft_n_accepted": reply.draft_n_accepted,
    }


def usage(reply: pb.Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}


def finish_reason(reply: pb.Reply, request: pb.PredictOptions, context_size: int, tool_calls: bool) -> str:
    """"tool_calls", "length" (the token limit or the context ran out) or "stop" (EOS or a stop string)."""
    if tool_calls:
        return "tool_calls"
    limit = min(request.Tokens, context_size - reply.prompt_tokens)
    return "length" if reply.tokens >= limit else "stop"


def _tool_calls(delta: pb.ChatDelta | None) -> list[dict[str, Any]]:
    if delta is None:
        return []
    return [{"index": tc.index, "id": tc.id, "type": "function",
             "function": {"name": tc.name, "arguments": tc.arguments}} for tc in delta.tool_calls]


def _logprob_items(raw: bytes) -> list[dict[str, Any]]:
    return json.loads(raw)["content"] if raw else []


def legacy_logprobs(items: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Chat-format logprob items -> the `/v1/completions` shape (tokens, token_logprobs, top_logprobs, offsets)."""
    offsets, pos = [], offset
    for item in items:
        offsets.append(pos)
        pos += len(item["token"])
    return {
        "tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
        "top_logprobs": [{t["token"]: t["logprob"] for t in i.get("top_logprobs", [])} for i in items],
        "text_offset": offsets,
    }


@dataclass
class Job:
    """One completion in flight: its kind, the proto request and the envelope of every response object."""

    kind: str  # "chat" or "text"
    request: pb.PredictOptions
    model: ServedModel
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = self.created or int(time.time())

    def envelope(self, chunk: bool = False) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model.name}

    def finish(self, reply: pb.Reply, calls: bool) -> str:
        return finish_reason(reply, self.request, self.model.context_size, calls)


def completion_response(job: Job, reply: pb.Reply) -> dict[str, Any]:
    """A non-streamed `chat.completion` or `text_completion` from Predict's Reply."""
    delta = reply.chat_deltas[0] if reply.chat_deltas else None
    text = delta.content if delta else reply.message.decode("utf-8", "replace")
    calls = _tool_calls(delta)
    items = _logprob_items(reply.logprobs)
    if job.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if delta and delta.reasoning_content:
            message["reasoning_content"] = delta.reasoning_content
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        choice = {"index": 0, "message": message, "logprobs": {"content": items} if job.request.Logprobs else None}
    else:
        choice = {"index": 0, "text": text, "logprobs": legacy_logprobs(items) if job.request.Logprobs else None}
    choice["finish_reason"] = job.finish(reply, bool(calls))
    return {**job.envelope(), "choices": [choice], "usage": usage(reply), "timings": timings(reply)}


class StreamFormatter:
    """Turns the Replies of one PredictStream into OpenAI stream chunks (`chat.completion.chunk` / text)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.offset = 0  # text offset for legacy logprobs

    def _chunk(self, payload: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        key = "delta" if self.job.kind == "chat" else "text"
        return {**self.job.envelope(chunk=True),
                "choices": [{"index": 0, key: payload, "logprobs": logprobs, "finish_reason": finish}]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.job.kind == "chat" else []

    def delta(self, reply: pb.Reply) -> dict[str, Any] | None:
        d = reply.chat_deltas[0] if reply.chat_deltas else None
        content = d.content if d else reply.message.decode("utf-8", "replace")
        reasoning = d.reasoning_content if d else ""
        if not content and not reasoning:
            return None
        items = _logprob_items(reply.logprobs)
        if self.job.kind == "text":
            lp = legacy_logprobs(items, self.offset) if self.job.request.Logprobs else None
            self.offset += len(content)
            return self._chunk(content, logprobs=lp)  # type: ignore[arg-type]
        payload = {"content": content} if content else {}
        if reasoning:
            payload["reasoning_content"] = reasoning
        return self._chunk(payload, logprobs={"content": items} if self.job.request.Logprobs else None)

    def closing(self, final: pb.Reply) -> list[dict[str, Any]]:
        """Tool calls (if any), the chunk with finish_reason + usage + timings, and the usage-only chunk if asked."""
        calls = _tool_calls(final.chat_deltas[0] if final.chat_deltas else None)
        out = [self._chunk({"tool_calls": calls})] if calls else []
        last = self._chunk({} if self.job.kind == "chat" else "", finish=self.job.finish(final, bool(calls)))
        out.append({**last, "usage": usage(final), "timings": timings(final)})
        if self.job.include_usage:
            out.append({**self.job.envelope(chunk=True), "choices": [], "usage": usage(final),
                        "timings": timings(final)})
        return out


def embeddings_request(body: dict[str, Any], model: ServedModel) -> list[pb.PredictOptions]:
    """One Embedding call per input (a string, an array of strings, or token arrays)."""
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise _invalid("input", "input must be a non-empty string or array")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise _invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str) and item:
            out.append(pb.PredictOptions(Embeddings=item, ModelIdentity=model.identity))
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append(pb.PredictOptions(EmbeddingTokens=item, ModelIdentity=model.identity))
        else:
            raise _invalid(f"input[{i}]", "each input must be a non-empty string or array of token ids")
    return out


def embeddings_response(results: list[pb.EmbeddingResult], model: ServedModel, encoding: str) -> dict[str, Any]:
    def vector(r: pb.EmbeddingResult) -> Any:
        if encoding == "base64":  # little-endian float32, what the openai client decodes by default
            return base64.b64encode(struct.pack(f"<{len(r.embeddings)}f", *r.embeddings)).decode()
        return list(r.embeddings)

    n = sum(r.prompt_tokens or r.tokens for r in results)
    return {"object": "list", "model": model.name, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": vector(r)} for i, r in enumerate(results)]}


def http_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The one mapping from errors (ours and the backend's gRPC statuses) to an HTTP status and OpenAI error body."""
    code, param = None, getattr(exc, "param", None)
    if isinstance(exc, grpc.RpcError):
        message = exc.details() or str(exc.code())
        status, kind = GRPC_TO_HTTP.get(exc.code(), (500, "server_error"))
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "context window" in message:
            code = "context_length_exceeded"
    elif isinstance(exc, ContextOverflowError):
        status, kind, code, message = 400, "invalid_request_error", "context_length_exceeded", str(exc)
    elif isinstance(exc, InvalidRequestError):
        status, kind, message = 400, "invalid_request_error", str(exc)
    elif isinstance(exc, LookupError):
        status, kind, code, message = 404, "invalid_request_error", "model_not_found", str(exc)
    elif isinstance(exc, (NoModelLoadedError, ModelLoadError)):
        status, kind, message = 503, "unavailable_error", str(exc)
    else:
        status, kind, message = 500, "server_error", f"{type(exc).__name__}: {exc}"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------- the backend subprocess


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
    server: "ApiServer"
    ROUTES: dict[str, tuple[str, str]] = {
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
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise _invalid(None, f"request body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _invalid(None, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _invalid(None, "request body must be a JSON object")
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
            raise _invalid("model", f"{model.name} is served without embeddings: restart with `apexmtp run --embeddings`")
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

    def start(self) -> "ApiServer":
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
            raise _invalid("model", "model must be a string")
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
    progress: bool = True
    echo_backend: bool = True


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model arguments `run` and `chat` share."""
    parser.add_argument("ref", nargs="?", help="model: gallery name, owner/repo@Tier, owner/repo@File.gguf, "
                        "hf:// URI, a .gguf path, `demo` (default: SmolLM2, offline) or `demo-mtp`")
    parser.add_argument("--tier", help="force a tier, e.g. I-Balanced (default: the best that fits this machine)")
    parser.add_argument("--context", type=int, help="context size (default: as large as fits)")
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
                      no_mtp=args.no_mtp, progress=not args.quiet, echo_backend=not args.quiet)
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops the backend.
    signal.signal(signal.SIGTERM, _raise_interrupt)
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
