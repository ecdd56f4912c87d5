"""Quantization jobs for LocalAI's StartQuantization / QuantizationProgress / StopQuantization RPCs.

A job builds one or more APEX tiers (`quantization_type` = a tier name or a comma list) by running
`apexmtp quantize --progress json` in a child process: llama.cpp's quantizer cannot be interrupted from
Python and aborts the whole process on some inputs, so the server must never host it. Stopping kills the
child's process group and removes its unfinished `.partial` outputs; finished tiers stay. Jobs run one at a
time (the others wait as `queued`): quantization is CPU- and disk-bound.
"""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from backend.core.errors import ApexError, InvalidRequestError
from backend.core.parse import parse_bool
from backend.core.process import stop_process

log = logging.getLogger(__name__)

# extra_options key -> (CLI flag, takes a value)
OPTIONS: dict[str, tuple[str, bool]] = {
    "imatrix": ("--imatrix", True),
    "calibration": ("--calibration", True),
    "bands": ("--bands", True),
    "threads": ("--threads", True),
    "ctx": ("--ctx", True),
    "chunks": ("--chunks", True),
    "allow_requantize": ("--allow-requantize", False),
    "overwrite": ("--overwrite", False),
}
_STOP_GRACE_S = 5.0


class JobStatus(str, enum.Enum):
    """LocalAI's job states (QuantizationProgressUpdate.status)."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    CONVERTING = "converting"
    QUANTIZING = "quantizing"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report; `output_file` lists finished tier files (comma-separated) once there are any."""

    job_id: str
    progress_percent: float
    status: JobStatus
    message: str
    output_file: str = ""
    extra_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Job:
    id: str
    argv: list[str]
    tiers: list[str]
    partials: list[Path]
    units: int  # progress units: one per tier, plus one for collecting the imatrix
    state: ProgressUpdate
    outputs: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    stop_requested: bool = False
    imatrix_done: bool = False
    error: str = ""
    seq: int = 0


class QuantizationJobs:
    """Thread-safe registry of quantization jobs (one runs at a time)."""

    def __init__(self, *, python: str = sys.executable) -> None:
        self._python = python
        self._jobs: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._slot = threading.Semaphore(1)

    # -- RPCs ------------------------------------------------------------------------------------------

    def start(self, model: str, quantization_type: str, output_dir: str, job_id: str,
              extra_options: dict[str, str]) -> tuple[bool, str]:
        """Validate the request and queue the job; `(False, reason)` for bad input, nothing started then."""
        try:
            job = self._prepare(model, quantization_type, output_dir, job_id, dict(extra_options or {}))
        except ApexError as exc:
            return False, str(exc)
        with self._cond:
            old = self._jobs.get(job_id)
            if old is not None and not old.state.status.terminal:
                return False, f"job {job_id!r} is already {old.state.status.value}"
            self._jobs[job_id] = job
        threading.Thread(target=self._run, args=(job,), name=f"quantize-{job_id}", daemon=True).start()
        return True, f"queued {', '.join(job.tiers)} into {output_dir or 'the models directory'}"

    def progress(self, job_id: str) -> Iterator[ProgressUpdate]:
        """The job's current state, then every change until it finishes.

        Raises:
            InvalidRequestError: unknown job id (raised here, before iteration starts).
        """
        with self._cond:
            if job_id not in self._jobs:
                raise InvalidRequestError(f"unknown quantization job {job_id!r}")
        return self._follow(job_id)

    def stop(self, job_id: str) -> tuple[bool, str]:
        """Stop a queued or running job: kill the child, delete its unfinished outputs. Finished tiers stay."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return False, f"unknown quantization job {job_id!r}"
            if job.state.status.terminal:
                return False, f"job {job_id!r} already {job.state.status.value}"
            job.stop_requested = True
            proc = job.proc
        if proc is not None:
            stop_process(proc, _STOP_GRACE_S, group=True)  # the child and whatever it started
        else:
            self._finish(job, JobStatus.STOPPED, "stopped before it started")
        return True, f"stopping job {job_id!r}"

    # -- internals --------------------------------------------------------------------------------------

    def _prepare(self, model: str, quantization_type: str, output_dir: str, job_id: str,
                 options: dict[str, str]) -> _Job:
        from backend.core.constants import MODELS_DIR
        from backend.core.gguf_file import read_gguf

        from .quantize import PARTIAL_SUFFIX, model_stem, output_name
        from .recipes import BandMode, parse_tiers

        if not job_id.strip():
            raise InvalidRequestError("job_id is empty")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidRequestError(f"unknown extra_options {unknown}; known: {sorted(OPTIONS)}")
        source = Path(model).expanduser()
        if not source.is_absolute():
            source = MODELS_DIR / source
        info = read_gguf(source)  # ModelNotFoundError / InvalidGGUFError name the problem
        tiers = parse_tiers(quantization_type or "", cast(BandMode, options.get("bands", "fixed")))
        out = Path(output_dir).expanduser() if output_dir else MODELS_DIR
        argv = [self._python, "-m", "backend", "quantize", str(source), "--tier", ",".join(t.name for t in tiers),
                "-o", str(out), "--progress", "json"]
        for key, value in options.items():
            flag, takes_value = OPTIONS[key]
            if takes_value:
                argv += [flag, value]
            elif _flag_on(key, value):
                argv.append(flag)
        collects = any(t.imatrix for t in tiers) and "imatrix" not in options
        partials = [out / (output_name(source, t, info.has_mtp_head) + PARTIAL_SUFFIX) for t in tiers]
        partials.append(out / f"{model_stem(source)}.imatrix.gguf{PARTIAL_SUFFIX}")
        state = ProgressUpdate(job_id, 0.0, JobStatus.QUEUED, "waiting for a free quantization slot")
        return _Job(job_id, argv, [t.name for t in tiers], partials, len(tiers) + int(collects), state)

    def _publish(self, job: _Job, **changes: Any) -> None:
        with self._cond:
            job.state = replace(job.state, **changes)
            job.seq += 1
            self._cond.notify_all()

    def _finish(self, job: _Job, status: JobStatus, message: str) -> None:
        pct = 100.0 if status == JobStatus.COMPLETED else job.state.progress_percent
        self._publish(job, status=status, message=message, progress_percent=pct, output_file=",".join(job.outputs))

    def _follow(self, job_id: str) -> Iterator[ProgressUpdate]:
        seen = -1
        while True:
            with self._cond:
                job = self._jobs[job_id]
                while job.seq == seen:
                    self._cond.wait(timeout=30.0)
                seen, state = job.seq, job.state
            yield state
            if state.status.terminal:
                return

    def _run(self, job: _Job) -> None:
        with self._slot:
            with self._cond:
                if job.stop_requested:
                    return
                try:
                    job.proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                start_new_session=True)
                except OSError as exc:
                    job.error = f"cannot start the quantizer: {exc}"
            proc = job.proc
            if proc is None:
                self._finish(job, JobStatus.FAILED, job.error)
                return
            out, err = proc.stdout, proc.stderr
            assert out is not None and err is not None  # both piped
            self._publish(job, status=JobStatus.QUANTIZING, message="starting")
            stderr: list[str] = []
            drain = threading.Thread(target=lambda: stderr.extend(err), daemon=True)
            drain.start()
            for line in out:
                self._on_event(job, line)
            rc = proc.wait()
            drain.join(timeout=5)
        self._conclude(job, rc, stderr)

    def _on_event(self, job: _Job, line: str) -> None:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        kind = ev.get("event")
        offset = len(job.outputs) + int(job.imatrix_done)
        if kind == "progress":
            pct = 100.0 * (offset + float(ev.get("percent", 0)) / 100.0) / job.units
            self._publish(job, progress_percent=min(99.9, round(pct, 1)),
                          message=f"{ev.get('tier', '')}: {ev.get('stage', '')} {ev.get('message', '')}".strip())
        elif kind == "imatrix":
            job.imatrix_done = True
            self._publish(job, progress_percent=round(100.0 / job.units, 1),
                          message=f"importance matrix: {ev.get('weights')} weights in {ev.get('path')}")
        elif kind == "done":
            job.outputs.append(str(ev["path"]))
            metrics = {k: float(ev[k]) for k in ("size_bytes", "predicted_bytes", "seconds") if k in ev}
            metrics.update(tiers_done=float(len(job.outputs)), tiers_total=float(len(job.tiers)))
            self._publish(job, message=f"{ev.get('tier')} done: {Path(ev['path']).name}",
                          output_file=",".join(job.outputs), extra_metrics=metrics,
                          progress_percent=round(100.0 * (offset + 1) / job.units, 1))
        elif kind == "error":
            job.error = str(ev.get("message", ""))

    def _conclude(self, job: _Job, rc: int, stderr: list[str]) -> None:
        for p in job.partials:
            p.unlink(missing_ok=True)  # the child may have died mid-write
        if job.stop_requested:
            self._finish(job, JobStatus.STOPPED, f"stopped; finished tiers kept: {len(job.outputs)}")
        elif rc == 0:
            self._finish(job, JobStatus.COMPLETED, f"built {', '.join(job.tiers)}")
        else:
            reason = job.error or next((ln.strip() for ln in reversed(stderr) if ln.strip()), f"exit code {rc}")
            self._finish(job, JobStatus.FAILED, reason)


def _flag_on(key: str, value: str) -> bool:
    """Whether a flag option (`overwrite: "true"`) is set; a blank value leaves it off."""
    try:
        return parse_bool(value, empty=False)
    except ValueError as exc:
        raise InvalidRequestError(f"extra_options {key}: {exc}") from None


