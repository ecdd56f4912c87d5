"""`apexmtp`: one command in front of the backend, the gallery and the quantizer.

Each subcommand lives in the package that owns its capability and exposes `main(argv) -> int`; this module
only maps verbs to those functions (imported lazily, so `apexmtp hw` never loads llama.cpp).
"""

from __future__ import annotations

import importlib
import logging
import sys

# verb -> ("module:function", one-line help). Order is the order `apexmtp --help` shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("backend.api.server:main", "serve an OpenAI-compatible API for a model (no REF: offline demo)"),
    "chat": ("backend.api.chat_cli:main", "interactive terminal chat over the OpenAI-compatible API"),
    "backend": ("backend.service.server:main", "start the gRPC model-runner LocalAI launches (--addr HOST:PORT)"),
    "worker": ("backend.rpc.worker:main", "serve this host's devices to a backend over llama.cpp RPC (--addr HOST:PORT)"),
    "package-backend": ("backend.service.server:package_main", "write a LocalAI backend directory (run.sh) for this install"),
    "pull": ("gallery.pull:main", "resolve a model reference, pick the tier for this machine, download and verify"),
    "gallery": ("gallery.browse:main", "list, search or show gallery entries"),
    "hw": ("gallery.hw:main", "show detected hardware and the tier each model gets here, with the reason"),
    "synth": ("backend.synth.qwen35moe:main", "write a synthetic qwen35moe GGUF with an MTP head (tests, benchmarks, demo)"),
    "plan": ("quantizer.cli:plan_main", "print or export the APEX tensor-type plan of a GGUF"),
    "imatrix": ("quantizer.cli:imatrix_main", "collect an importance matrix (MTP head included)"),
    "quantize": ("quantizer.cli:quantize_main", "build APEX tiers from a BF16/F16 GGUF"),
    "eval": ("quantizer.cli:eval_main", "evaluate tiers against their source: PPL, KL, top-1, MTP acceptance"),
    "publish": ("quantizer.cli:publish_main", "write model card + gallery entries and upload to the HF hub"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: apexmtp COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    lines += ["", "`apexmtp COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default: `sys.argv[1:]`) to the subcommand it names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"apexmtp {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(verb, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"apexmtp: unknown command {verb!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target, _ = COMMANDS[verb]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
