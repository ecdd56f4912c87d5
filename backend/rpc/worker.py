"""`apexmtp worker`: a llama.cpp RPC server exposing this host's devices to a backend that splits a model across hosts.

It is llama.cpp's own server (`ggml_backend_rpc_start_server`, what the `rpc-server` tool runs) in this process:
every accelerator device ggml finds, else the CPU. The protocol has no authentication, so it binds to 127.0.0.1
unless told otherwise, and says loudly when it is not.

The C call serves forever and cannot be interrupted, so it runs on a daemon thread while the main thread waits
for SIGINT/SIGTERM and then ends the process with `os._exit`: the sockets close with it (a connected backend sees
its worker lost), and no C++ static destructor runs under the thread still inside the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..core import ggml
from ..core.cli_errors import cli_error
from ..core.endpoints import is_loopback, parse_endpoint
from ..core.errors import ApexError
from ..core.units import parse_size

DEFAULT_ADDR = "127.0.0.1:50052"  # LocalAI's `worker llama-cpp-rpc` default port


def exposure_warning(host: str, port: int) -> str | None:
    """The warning a worker reachable from other machines prints, None on loopback."""
    if is_loopback(host):
        return None
    return (f"WARNING: this RPC worker listens on {host}:{port}, reachable from other machines. llama.cpp's RPC "
            "protocol has NO authentication and NO encryption: anyone who can reach this port can use this "
            "machine's memory and compute and read or overwrite the model it holds. Use it only on a private "
            "network behind a firewall, never on an open one.")


def _check_bind(host: str, port: int) -> None:
    """Fail with the OS's reason now: llama.cpp only prints "Failed to create server socket" and returns."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family):
        pass


def main(argv: list[str]) -> int:
    """`apexmtp worker [--addr HOST:PORT] [--threads N] [--mem SIZE] [--cache DIR]`"""
    parser = argparse.ArgumentParser(prog="apexmtp worker", description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=DEFAULT_ADDR,
                        help=f"HOST:PORT to listen on (default {DEFAULT_ADDR}; 0.0.0.0 or a LAN address lets other "
                        "hosts in, without any authentication)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: one per physical core)")
    parser.add_argument("--mem", metavar="SIZE",
                        help="memory to offer, e.g. 12GiB: the backend splits layers by what workers report "
                        "(default: what each device reports; all of RAM for the CPU)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep received weights in DIR, so a reload of the same model sends only hashes")
    args = parser.parse_args(argv)
    try:
        host, port = parse_endpoint(args.addr)
        limit = parse_size(args.mem) if args.mem else None
        if args.threads < 0:
            raise ApexError(f"--threads must be >= 0, got {args.threads}")
        devices = ggml.server_devices()
    except ApexError as exc:
        return cli_error(parser.prog, exc, 2)
    warning = exposure_warning(host, port)
    if warning:
        print(f"apexmtp worker: {warning}", file=sys.stderr, flush=True)
    try:
        _check_bind(host, port)
    except OSError as exc:
        return cli_error(parser.prog, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    for dev in devices:
        if limit is not None:
            ggml.cap_memory(dev, limit)
        free, total = ggml.memory(dev)
        print(f"apexmtp worker: offering {ggml.name(dev)} ({ggml.description(dev)}): {total / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB free", file=sys.stderr)
    threads = args.threads or ggml.default_threads()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(sig, lambda *_: stop.set())
    server = threading.Thread(target=ggml.start_server, name="rpc-server", daemon=True,
                              args=(f"{host}:{port}", str(args.cache) if args.cache else None, threads, devices))
    server.start()
    print(f"apexmtp worker: listening on {host}:{port} ({threads} threads); Ctrl-C stops", file=sys.stderr, flush=True)
    # Wake twice a second: Python runs signal handlers only in the main thread, between bytecodes.
    while server.is_alive() and not stop.wait(0.5):
        pass
    sys.stdout.flush()
    if stop.is_set():
        print("apexmtp worker: stopped", file=sys.stderr, flush=True)
        os._exit(0)
    return cli_error(parser.prog, "llama.cpp's RPC server stopped (see its message above)")
