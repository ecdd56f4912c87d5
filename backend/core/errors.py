"""The one error hierarchy of apexmtp.

Every class inherits from `ApexError` *and* from the built-in exception a caller would naturally catch
(`FileNotFoundError`, `ValueError`, `OSError`, ...), so both `except ApexError` and `except ValueError`
work. Errors carry the facts that explain them as attributes (path, entry, expected/actual digest), and
their messages say what to do about it. The gRPC status code and the HTTP answer of every class are in one table
at the end of this module (`STATUSES`, read through `status_of`): the gRPC backend aborts with the code, the HTTP
edge answers with the status, and a gRPC error that names its class in the trailing metadata gets that class's HTTP
status (`GRPC_HTTP` only for errors that name none: a dead backend, a deadline, a cancelled call).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ApexError(Exception):
    """Base class of every error apexmtp raises on purpose."""


# --------------------------------------------------------------------------------------------- models


class ModelLoadError(ApexError):
    """A model could not be loaded; the message says why."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model file does not exist."""

    def __init__(self, path: str | Path, hint: str = "") -> None:
        self.path = str(path)
        super().__init__(f"model file not found: {self.path}" + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return self.args[0]


class InvalidGGUFError(ModelLoadError, ValueError):
    """The file is not a GGUF llama.cpp can read (bad magic, zero or corrupt header, truncated data)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: not a valid GGUF file: {reason}")


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    """The GGUF declares an architecture this llama.cpp build does not know."""

    def __init__(self, path: str | Path, architecture: str) -> None:
        self.path = str(path)
        self.architecture = architecture
        super().__init__(f"{self.path}: unsupported architecture {architecture!r}")


class InsufficientMemoryError(ApexError, MemoryError):
    """The model (or its context) does not fit in the memory available."""


class InsufficientDiskSpaceError(ApexError, OSError):
    """A download or quantization would not fit in the free space of its filesystem (nothing was written)."""

    def __init__(self, message: str, *, path: str | Path, need: int, free: int) -> None:
        self.path = str(path)
        self.need = need
        self.free = free
        super().__init__(message)

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror)
        return self.args[0]


class ModelMismatchError(ApexError, LookupError):
    """A request named a model (ModelIdentity) other than the one loaded."""


class EngineClosedError(ApexError, RuntimeError):
    """A call reached an engine whose llama.cpp objects were already freed (the model was unloaded)."""


class WorkerUnreachableError(ModelLoadError, ConnectionError):
    """An RPC worker (`apexmtp worker`, llama.cpp's rpc-server) cannot be used: unreachable, busy or incompatible."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"RPC worker {endpoint}: {reason}")
        self.endpoint = endpoint


class WorkerLostError(EngineClosedError):
    """An RPC worker holding part of the model went away; the model must be loaded again once it is back."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"RPC worker {endpoint} was lost ({reason}); load the model again once the worker is back")
        self.endpoint = endpoint


class NoModelLoadedError(ApexError, RuntimeError):
    """A request needs a model and none is loaded (call LoadModel first)."""

    def __init__(self, message: str = "no model loaded: call LoadModel first") -> None:
        super().__init__(message)


class RerankUnavailableError(ApexError, RuntimeError):
    """Rerank reached a model loaded without reranking: no classification head, or Reranking was not set."""


# ------------------------------------------------------------------------------------------- requests


class InvalidRequestError(ApexError, ValueError):
    """A request carries a value outside its domain (sampler values, options, messages).

    `param` names the offending request field when one is to blame (OpenAI errors carry it as `param`).
    """

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidOptionError(InvalidRequestError):
    """A `key:value` model option is unknown or has a bad value."""


class RequestRefusedError(InvalidRequestError):
    """An HTTP request refused for its framing, before its body is read or used; the connection is closed."""


class LengthRequiredError(RequestRefusedError):
    """A body sent without a Content-Length (chunked)."""


class RequestTooLargeError(RequestRefusedError):
    """A body, or the backend message made from it, larger than the limit."""


class UnsupportedMediaTypeError(RequestRefusedError):
    """A page action sent as something other than JSON."""


class CrossOriginError(RequestRefusedError):
    """A page action sent from another site's page."""


class MisdirectedRequestError(RequestRefusedError):
    """A Host this server does not answer for (DNS rebinding protection)."""


class UnauthorizedError(RequestRefusedError):
    """A missing or wrong API key."""


class RouteNotFoundError(RequestRefusedError):
    """A path (or file) this server has no route for."""


class MethodNotAllowedError(RequestRefusedError):
    """A route asked with the wrong method."""


class ContextOverflowError(InvalidRequestError):
    """The prompt (plus requested tokens) does not fit the context window."""

    def __init__(self, n_prompt: int, n_ctx: int) -> None:
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        super().__init__(
            f"prompt is {n_prompt} tokens but the context window is {n_ctx} tokens; "
            "shorten the prompt or load the model with a larger ContextSize"
        )


# -------------------------------------------------------------------------------------------- gallery


class GalleryError(ApexError):
    """Base class for gallery, resolution and download errors."""


class SchemaError(GalleryError, ValueError):
    """A YAML file does not follow its schema; names the file, entry and field."""

    def __init__(self, source: str, entry: str, field: str, problem: str) -> None:
        self.source = source
        self.entry = entry
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: entry {entry!r}, field {field!r}: {problem}")


class EntryNotFoundError(GalleryError, LookupError):
    """A model reference matched nothing (gallery name, tier or file)."""


class UnsafePathError(GalleryError, ValueError):
    """A path from a gallery entry would land outside the models directory."""

    def __init__(self, path: str, root: str | Path) -> None:
        self.path = path
        self.root = str(root)
        super().__init__(f"refusing path {path!r}: it escapes the models directory {self.root}")


class DownloadError(GalleryError, OSError):
    """A download failed; partial data is kept for resumption where possible."""


class ChecksumMismatchError(DownloadError):
    """Downloaded bytes do not hash to the pinned sha256; the file was not installed."""

    def __init__(self, path: str | Path, expected: str, actual: str) -> None:
        self.path = str(path)
        self.expected = expected
        self.actual = actual
        super().__init__(f"sha256 mismatch for {self.path}: expected {expected}, got {actual}")

    def __str__(self) -> str:
        return self.args[0]


# ------------------------------------------------------------------------------------------ quantizer


class QuantizerError(ApexError):
    """Base class for quantizer errors."""


class RecipeError(QuantizerError, ValueError):
    """A tier recipe is unknown or malformed."""


class PlanError(QuantizerError, ValueError):
    """A tensor-type plan is incomplete or ambiguous (a tensor matched by zero or several rules)."""


class MissingImatrixError(QuantizerError, ValueError):
    """The plan asks for an IQ1/IQ2/IQ3_XXS type on a tensor that has no importance-matrix data."""


# --------------------------------------------------------------------------------- gRPC codes and HTTP statuses


@dataclass(frozen=True)
class Status:
    """How errors of one class are answered: a gRPC status code (a `grpc.StatusCode` name, so this module needs no
    grpc) and, over HTTP, a status with OpenAI's error `type` and `code`."""

    grpc: str
    http: int
    kind: str = "invalid_request_error"
    code: str | None = None


_UNAVAILABLE = Status("UNAVAILABLE", 503, "unavailable_error")

# The first class an error is an instance of wins: subclasses come before their bases. ModelLoadError and
# DownloadError are INTERNAL over gRPC (LoadModel reports its failures in-band), yet mean "no model yet" (503) and a
# failed upstream (502) to an HTTP client. An exception of none of these classes is a bug: INTERNAL, 500, logged.
STATUSES: tuple[tuple[type[ApexError], Status], ...] = (
    (ContextOverflowError, Status("INVALID_ARGUMENT", 400, code="context_length_exceeded")),
    (LengthRequiredError, Status("INVALID_ARGUMENT", 411, code="length_required")),
    (RequestTooLargeError, Status("RESOURCE_EXHAUSTED", 413, code="request_too_large")),
    (UnsupportedMediaTypeError, Status("INVALID_ARGUMENT", 415, code="unsupported_media_type")),
    (CrossOriginError, Status("PERMISSION_DENIED", 403, code="cross_origin")),
    (MisdirectedRequestError, Status("INVALID_ARGUMENT", 421, code="misdirected_request")),
    (UnauthorizedError, Status("UNAUTHENTICATED", 401, code="invalid_api_key")),
    (RouteNotFoundError, Status("UNIMPLEMENTED", 404, code="not_found")),
    (MethodNotAllowedError, Status("UNIMPLEMENTED", 405, code="method_not_allowed")),
    (RequestRefusedError, Status("INVALID_ARGUMENT", 400, code="invalid_request")),
    (InvalidRequestError, Status("INVALID_ARGUMENT", 400)),
    (ModelNotFoundError, Status("NOT_FOUND", 404, code="model_not_found")),
    (EntryNotFoundError, Status("NOT_FOUND", 404, code="model_not_found")),
    (ModelMismatchError, Status("NOT_FOUND", 404, code="model_not_found")),
    (NoModelLoadedError, Status("FAILED_PRECONDITION", 503, "unavailable_error")),
    (RerankUnavailableError, Status("FAILED_PRECONDITION", 503, "unavailable_error")),
    (EngineClosedError, _UNAVAILABLE),
    (InsufficientMemoryError, Status("RESOURCE_EXHAUSTED", 503, "unavailable_error", "insufficient_memory")),
    (InsufficientDiskSpaceError, Status("RESOURCE_EXHAUSTED", 503, "unavailable_error")),
    (ModelLoadError, Status("INTERNAL", 503, "unavailable_error")),
    (DownloadError, Status("INTERNAL", 502, "server_error", "download_failed")),
    (ApexError, Status("INTERNAL", 500, "server_error")),
)
BUG = Status("INTERNAL", 500, "server_error")

# The gRPC trailing metadata keys that name an error's class and the PredictOptions field to blame (its `param`):
# clients map the error exactly, without parsing its message.
ERROR_TYPE_KEY, ERROR_PARAM_KEY = "apexmtp-error", "apexmtp-param"

# The HTTP answer to a gRPC error that names no class of ours (see the module doc). UNAVAILABLE is a dead backend,
# CANCELLED that reaches a client the channel closing; a code not listed is a 500.
GRPC_HTTP: dict[str, Status] = {
    "INVALID_ARGUMENT": Status("INVALID_ARGUMENT", 400),
    "NOT_FOUND": Status("NOT_FOUND", 404),
    "FAILED_PRECONDITION": Status("FAILED_PRECONDITION", 503, "unavailable_error"),
    "RESOURCE_EXHAUSTED": Status("RESOURCE_EXHAUSTED", 503, "unavailable_error"),
    "UNAVAILABLE": _UNAVAILABLE,
    "CANCELLED": Status("CANCELLED", 503, "unavailable_error"),
    "DEADLINE_EXCEEDED": Status("DEADLINE_EXCEEDED", 504, "server_error"),
    "UNIMPLEMENTED": Status("UNIMPLEMENTED", 501),
}


def status_of(error: BaseException | type[BaseException]) -> Status:
    """The Status of an error (or error class): its row in `STATUSES`, `BUG` for anything not ours."""
    cls = error if isinstance(error, type) else type(error)
    return next((status for base, status in STATUSES if issubclass(cls, base)), BUG)
