"""LocalAI quantization jobs: start / progress / stop around a real `apexmtp quantize` child process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backend.core.errors import InvalidRequestError
from backend.synth.qwen35moe import SynthConfig, write_model
from quantizer.jobs import JobStatus, QuantizationJobs


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SynthConfig(n_layer=6, n_expert=4, n_expert_used=2)
    return write_model(tmp_path_factory.mktemp("jobs") / "Job-F16.gguf", cfg, mode="random", dtype="f16")


def test_job_runs_to_completion_with_progress(source: Path, tmp_path: Path) -> None:
    jobs = QuantizationJobs()
    ok, msg = jobs.start(str(source), "I-Compact,Balanced", str(tmp_path), "j1",
                         {"bands": "scaled", "ctx": "128", "chunks": "2"})
    assert ok, msg
    updates = list(jobs.progress("j1"))
    statuses = [u.status for u in updates]
    assert statuses[-1] == JobStatus.COMPLETED, updates[-1].message
    assert JobStatus.QUANTIZING in statuses
    pcts = [u.progress_percent for u in updates]
    assert pcts == sorted(pcts) and pcts[-1] == 100.0
    final = updates[-1]
    files = final.output_file.split(",")
    assert [Path(f).name for f in files] == ["Job-APEX-MTP-I-Compact.gguf", "Job-APEX-MTP-Balanced.gguf"]
    assert all(Path(f).exists() for f in files)
    assert final.extra_metrics["tiers_done"] == 2.0 and final.extra_metrics["size_bytes"] > 0
    # a finished job can be followed again (one terminal update) and not stopped
    assert [u.status for u in jobs.progress("j1")] == [JobStatus.COMPLETED]
    assert jobs.stop("j1")[0] is False


def test_bad_requests_are_refused_without_starting(source: Path, tmp_path: Path) -> None:
    jobs = QuantizationJobs()
    ok, msg = jobs.start(str(source), "Huge", str(tmp_path), "a", {})
    assert not ok and "unknown tier" in msg
    ok, msg = jobs.start(str(source), "Mini", str(tmp_path), "b", {})
    assert not ok and "I-Mini" in msg
    ok, msg = jobs.start(str(tmp_path / "missing.gguf"), "Compact", str(tmp_path), "c", {})
    assert not ok and "not found" in msg
    ok, msg = jobs.start(str(source), "Compact", str(tmp_path), "d", {"frobnicate": "1"})
    assert not ok and "frobnicate" in msg
    ok, msg = jobs.start(str(source), "Compact", str(tmp_path), "", {})
    assert not ok and "job_id" in msg
    with pytest.raises(InvalidRequestError, match="unknown quantization job"):
        jobs.progress("nope")
    assert jobs.stop("nope") == (False, "unknown quantization job 'nope'")
    assert not any(tmp_path.iterdir())


def test_stop_kills_the_child_and_removes_partial_output(source: Path, tmp_path: Path) -> None:
    jobs = QuantizationJobs()
    # I-Micro's IQ1_M search is the slowest tier: plenty of time to stop it mid-way
    ok, msg = jobs.start(str(source), "I-Micro", str(tmp_path), "s", {"bands": "scaled", "ctx": "128", "chunks": "2"})
    assert ok, msg
    deadline = time.monotonic() + 60
    for u in jobs.progress("s"):
        if u.status == JobStatus.QUANTIZING and "I-Micro" in u.message or time.monotonic() > deadline:
            break
    ok, msg = jobs.stop("s")
    assert ok, msg
    final = list(jobs.progress("s"))[-1]
    assert final.status == JobStatus.STOPPED
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*APEX*.gguf"))
    # a stopped job id can be reused
    assert jobs.start(str(source), "Compact", str(tmp_path), "s", {"bands": "scaled"})[0]
    assert list(jobs.progress("s"))[-1].status == JobStatus.COMPLETED
