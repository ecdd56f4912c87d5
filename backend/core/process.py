"""Stopping a child process the way a service manager (and LocalAI) does: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float, *, group: bool = False) -> int:
    """SIGTERM `proc` (its whole process group with `group`, for a child started with `start_new_session`), wait
    up to `timeout` seconds for it to exit, SIGKILL it if it has not, and reap it. Returns its exit status; a
    process that has already exited is only reaped."""
    _send(proc, signal.SIGTERM, group)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _send(proc, signal.SIGKILL, group)
        return proc.wait()


def _send(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)  # nothing, once the process has been reaped
    except ProcessLookupError:  # it exited (and the group emptied) in the meantime
        pass
