"""The gRPC backend as a subprocess, started and stopped as LocalAI does it.

The backend is spawned as `backend/run.sh --addr 127.0.0.1:<port>`, polled with Health and given LoadModel with
the options a LocalAI model config names (`model_options`); afterwards every request goes over gRPC only.
"""

from __future__ import annotations

import collections
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from ..core import constants
from ..core.errors import ModelLoadError, NoModelLoadedError
from ..core.process import stop_process
from ..proto import backend_pb2 as pb
from ..proto import backend_pb2_grpc as pb_grpc
from . import webui

log = logging.getLogger(__name__)

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"


def _flash(value: Any) -> str:
    # YAML reads a bare `on` as True: map booleans back to the backend's words.
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value or "")


def model_options(config: dict[str, Any], models_dir: Path, *, threads: int = 0,
                  embeddings: bool = False, reranking: bool = False) -> pb.ModelOptions:
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
        Reranking=reranking or bool(config.get("reranking", False)),
        MMProj=_under(str(config["mmproj"]), models_dir) if config.get("mmproj") else "",
    )


def _under(path: str, models_dir: Path) -> str:
    """A config path as LocalAI hands it to a backend: relative ones resolved against the models directory."""
    return path if Path(path).is_absolute() else str(models_dir / path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now (the system picks it)."""
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
        stop_process(self.proc, grace)
