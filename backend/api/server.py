"""`apexmtp run [REF]`: an OpenAI-compatible HTTP API in front of our gRPC backend, started as LocalAI starts it.

The path is LocalAI's: `gallery.pull` resolves REF and writes the model's LocalAI config; the backend is spawned
as `backend/run.sh --addr 127.0.0.1:<port>`, polled with Health and given LoadModel with the options that config
names; every request then goes over gRPC only.

The trades, innermost first: the pure translation between OpenAI JSON and proto messages (`backend.api.openai_api`),
the backend subprocess (`backend.api.supervisor`), the model it serves, loaded and switched
(`backend.api.models`), what the web page shows (`backend.api.webui`), the hardened HTTP server
(`backend.api.httpd`) and the routes (`backend.api.handler`). This module is the command: its arguments and `serve`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from ..core import constants
from ..core.cli_errors import cli_error
from ..core.endpoints import parse_endpoints
from ..core.errors import ApexError
from .handler import ApiServer
from .httpd import DEFAULT_WORKERS, exposure_warning, parse_keys
from .models import DEFAULT_PARALLEL, RunOptions


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
    parser.add_argument("--reranking", action="store_true",
                        help="enable /v1/rerank (a reranker GGUF: a model with a classification head)")
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
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="KEY[:VALUE]",
                        help="a backend option, as a LocalAI model YAML's `options:` list holds them (e.g. "
                        "adaptive_threads:false, spec_n_max:4, a bare use_jinja; the README's option table); "
                        "repeatable, wins over the plan's")


def _option(text: str) -> str:
    if not text.partition(":")[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY or KEY:VALUE, got {text!r}")
    return text


def backend_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The backend options (LocalAI's names) that the prompt-reuse flags of `add_run_arguments` set, then the
    `--option`s as given."""
    given = {"cache_ram": args.cache_ram, "ctx_checkpoints": args.ctx_checkpoints,
             "checkpoint_min_step": args.checkpoint_min_step,
             "prompt_cache_dir": args.prompt_cache.expanduser().resolve() if args.prompt_cache else None}
    return tuple(f"{key}:{value}" for key, value in given.items() if value is not None) + tuple(args.option)

def serve(opts: RunOptions) -> ApiServer:
    """Bind the HTTP port, serve (503 while loading), start the backend and load the model. Caller closes it."""
    server = ApiServer(opts.host, opts.port, options=opts).start()
    try:
        server.manager.start()
    except BaseException:
        server.close()
        raise
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
                      reranking=args.reranking,
                      no_mtp=args.no_mtp, parallel=args.parallel, prefer=args.prefer, progress=not args.quiet,
                      echo_backend=not args.quiet, gallery=args.gallery,
                      api_keys=parse_keys([*(args.api_key or []), constants.API_KEY]),
                      http_workers=args.http_workers, rpc=args.rpc, mmproj=args.mmproj,
                      backend_options=backend_options(args))
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
        model = server.manager.model
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
        return cli_error(parser.prog, exc)
    finally:
        if server is not None:
            server.close()
    return 0
