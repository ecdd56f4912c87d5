"""How every `apexmtp` command ends on an error: one line, `apexmtp COMMAND: error: ...`, on stderr, and an exit code."""

from __future__ import annotations

import sys


def cli_error(prog: str, error: object, code: int = 1) -> int:
    """Print `PROG: error: ERROR` (PROG is the command's `apexmtp VERB`) to stderr; return `code` for `main` to return.

    Our errors' messages say what to do, so the message is all there is: no traceback, no class name.
    """
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return code
