"""Environment knobs: read in one place (backend/core/constants.py), Go durations as LocalAI writes them, and a bad
value of any knob is a logged warning and the default, never a process that cannot start (real subprocesses)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.core import constants
from backend.core.constants import knob, parse_duration
from backend.core.parse import parse_bool

ROOT = Path(__file__).resolve().parent.parent
KNOBS = ("LLAMACPP_PARALLEL", "LOCALAI_GRPC_AUTH_TOKEN", "LOCALAI_BACKEND_PARENT_WATCH",
         "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", "APEXMTP_MODELS_DIR", "APEXMTP_CACHE_DIR", "APEXMTP_LLAMA_LOG",
         "APEXMTP_VRAM", "APEXMTP_RAM", "CUDA_VISIBLE_DEVICES", "HF_ENDPOINT", "LLAMACPP_GRPC_SERVERS",
         "APEXMTP_RPC_TIMEOUT")
GARBAGE = {"LLAMACPP_PARALLEL": "lots", "LOCALAI_BACKEND_PARENT_WATCH": "maybe",
           "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "soon", "APEXMTP_LLAMA_LOG": "-3", "APEXMTP_VRAM": "huge",
           "APEXMTP_RAM": "1.5 bananas", "LLAMACPP_GRPC_SERVERS": "host-without-port", "APEXMTP_RPC_TIMEOUT": "0s"}
DUMP = ("import json, backend.core.constants as c; print(json.dumps({'parallel': c.LLAMACPP_PARALLEL, "
        "'watch': c.PARENT_WATCH, 'interval': c.PARENT_WATCH_INTERVAL_S, 'log': c.LLAMA_LOG_LEVEL, "
        "'vram': c.VRAM_OVERRIDE, 'ram': c.RAM_OVERRIDE, 'models': str(c.MODELS_DIR), 'rpc': c.RPC_SERVERS, "
        "'rpc_timeout': c.RPC_TIMEOUT_S}))")


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repository root with only `env` for apexmtp's knobs (none inherited)."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("2s", 2), ("1m30s", 90), ("1h", 3600), ("300us", 300e-6), ("300µs", 300e-6),
    ("300μs", 300e-6), ("1500ns", 1.5e-6), ("1.5h", 5400), ("2h45m", 9900), ("1h2m3s4ms", 3723.004), (".5s", 0.5),
    ("-1.5s", -1.5), ("+2s", 2), ("0", 0), ("2", 2), ("0.25", 0.25), (" 2s ", 2),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "ms", "soon", "2x", "1m30", "1.2.3s", "--1s", "2 s", "1e3s", "nan",
                                  "inf", "500m s", "1d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_booleans() -> None:
    words = ("1", "TRUE", "yes", "On", " enabled ", "0", "false", "NO", "off", "Disabled")
    assert [parse_bool(t) for t in words] == [True] * 5 + [False] * 5
    for bad in ("maybe", "", "  "):
        with pytest.raises(ValueError, match="not a boolean"):
            parse_bool(bad)
    # Where a caller gives a blank a meaning (a bare option key is "on", a missing flag "off"), it gets that.
    assert parse_bool("", empty=True) is True and parse_bool(" ", empty=False) is False
    assert parse_bool("off", empty=True) is False
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("sometimes", empty=True)


def test_bad_knob_logs_a_warning_and_keeps_the_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.core.constants"):
        assert knob("X_INTERVAL", parse_duration, 2.0, environ={"X_INTERVAL": "soon"}) == 2.0
        assert knob("X_INTERVAL", parse_duration, 2.0, environ={"X_INTERVAL": "  "}) == 2.0  # blank = unset
        assert knob("X_INTERVAL", parse_duration, 2.0, environ={"X_INTERVAL": "500ms"}) == 0.5
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring X_INTERVAL='soon': not a duration: 'soon' (use e.g. 500ms, 2s, 1m30s or a number of seconds); "
        "using the default (2.0)"]


def test_knobs_parse_at_import() -> None:
    env = {"LLAMACPP_PARALLEL": "3", "LOCALAI_BACKEND_PARENT_WATCH": "off",
           "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "500ms", "APEXMTP_LLAMA_LOG": "1", "APEXMTP_VRAM": "24GiB",
           "APEXMTP_RAM": "64G", "APEXMTP_MODELS_DIR": "~/m", "LLAMACPP_GRPC_SERVERS": "10.0.0.2:50052,b:1",
           "APEXMTP_RPC_TIMEOUT": "1m30s"}
    done = _python(["-c", DUMP], env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout) == {"parallel": 3, "watch": False, "interval": 0.5, "log": 1, "vram": 24 * 2**30,
                                       "ram": 64 * 2**30, "models": str(Path("~/m").expanduser()),
                                       "rpc": ["10.0.0.2:50052", "b:1"], "rpc_timeout": 90.0}


def test_garbage_in_every_knob_warns_and_uses_the_defaults() -> None:
    done = _python(["-c", DUMP], GARBAGE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"parallel": 1, "watch": True, "interval": 2.0, "log": 0, "vram": None,
                                       "ram": None, "models": str(constants.MODELS_DIR), "rpc": [],
                                       "rpc_timeout": 300.0}
    warned = re.findall(r"^ignoring (\w+)=", done.stderr, re.MULTILINE)
    assert warned == list(GARBAGE), done.stderr


@pytest.mark.parametrize("env", [{"LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "500ms"}, GARBAGE],
                         ids=["go-duration", "garbage"])
def test_backend_server_starts_with(env: dict[str, str]) -> None:
    done = _python(["-m", "backend.service.server", "--help"], env)
    assert done.returncode == 0, done.stderr
    assert "--addr" in done.stdout
    assert ("ignoring" in done.stderr) == (env is GARBAGE), done.stderr


def test_the_environment_is_read_only_in_constants() -> None:
    """One place reads the environment, so every knob has one parser, one default and one warning."""
    pattern = re.compile(r"\bos\.environ\b|\bgetenv\(|\benviron\.get\(")
    readers = [str(p.relative_to(ROOT)) for pkg in ("backend", "gallery", "quantizer")
               for p in sorted((ROOT / pkg).rglob("*.py")) if pattern.search(p.read_text())]
    assert readers == ["backend/core/constants.py"]
