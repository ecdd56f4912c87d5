"""Start the gRPC backend the way LocalAI does: `run.sh --addr HOST:PORT` (or `apexmtp backend --addr ...`)."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import grpc

from ..core import constants
from ..core.cli_errors import cli_error
from ..proto import backend_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every RPC (LOCALAI_GRPC_AUTH_TOKEN), compared in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing bearer token")

        async def deny_stream(request: object, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing bearer token")
            yield  # pragma: no cover - makes this an async generator, as streaming handlers are

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, handler_call_details):
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny


# Read at import, before the servicer and llama.cpp load: a parent that exits during start-up is still noticed.
_PARENT = os.getppid()


def _watch_parent(interval: float, parent: int = _PARENT) -> None:
    """Exit when the process that started us (LocalAI) is gone, so no backend is ever orphaned."""

    def loop() -> None:
        while True:
            threading.Event().wait(interval)
            if os.getppid() != parent:
                log.warning("parent process %d exited; shutting down", parent)
                os._exit(1)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


async def serve(addr: str) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting calls, free the model and return.

    The server is asyncio: a waiting or streaming request holds no thread, so Health and Status answer at once
    under any load (a thread pool of PYTHON_GRPC_MAX_WORKERS would be exhausted by that many streams).

    Raises:
        OSError: `addr` cannot be listened on.
    """
    from .servicer import BackendServicer

    interceptors = [AuthInterceptor(constants.GRPC_AUTH_TOKEN)] if constants.GRPC_AUTH_TOKEN else []
    limit = constants.GRPC_MESSAGE_LIMIT
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                 ("grpc.max_message_length", limit)],
    )
    servicer = BackendServicer()
    pb_grpc.add_BackendServicer_to_server(servicer, server)
    if server.add_insecure_port(addr) == 0:
        raise OSError(f"cannot listen on {addr}")
    await server.start()
    log.info("apexmtp backend listening on %s%s", addr, " (auth on)" if interceptors else "")
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def shut_down(signum: int) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shut_down, signum)
    if constants.PARENT_WATCH:
        _watch_parent(constants.PARENT_WATCH_INTERVAL_S)
    await done.wait()
    await server.stop(grace=2)
    await servicer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apexmtp backend", description="LocalAI gRPC model-runner backend")
    parser.add_argument("--addr", default="localhost:50051", help="HOST:PORT to listen on (LocalAI passes this)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.addr))
    except OSError as exc:
        return cli_error(parser.prog, exc)
    return 0


def package_main(argv: list[str] | None = None) -> int:
    """`apexmtp package-backend DIR`: a directory LocalAI can install (`local-ai backends install DIR apexmtp`)."""
    parser = argparse.ArgumentParser(prog="apexmtp package-backend", description=package_main.__doc__)
    parser.add_argument("out", type=Path, help="directory to create")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.out / "run.sh"
    run.write_text(
        "#!/usr/bin/env bash\n"
        "# Generated by `apexmtp package-backend`: runs the apexmtp backend from its installed environment.\n"
        f'exec "{sys.executable}" -m backend.service.server "$@"\n'
    )
    run.chmod(0o755)
    (args.out / "metadata.json").write_text('{"name": "apexmtp", "alias": "apexmtp"}\n')
    print(f"wrote {run}\ninstall it with: local-ai backends install {args.out} apexmtp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
