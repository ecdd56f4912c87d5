#!/usr/bin/env bash
# LocalAI launches a backend as `run.sh --addr HOST:PORT`, from any working directory.
# Python comes from, in order: $APEXMTP_PYTHON, the project's .venv beside this directory, the venv of a
# packaged backend dir (`apexmtp package-backend`), then python3 on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for candidate in "${APEXMTP_PYTHON:-}" "$here/../.venv/bin/python" "$here/venv/bin/python"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        exec "$candidate" -m backend.service.server "$@"
    fi
done
exec python3 -m backend.service.server "$@"
