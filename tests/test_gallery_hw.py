"""What the installed llama.cpp build can run on (read from the real library: this project's CI build is CPU-only),
and what `apexmtp hw`, the selector and the backend's LoadModel tell a user whose GPU that build cannot use: CPU
plans and the exact reinstall command. GPUs come from a fake `nvidia-smi` on PATH (a real subprocess)."""

from __future__ import annotations

import json
import logging
import stat
import threading
from pathlib import Path

import pytest

from backend.core.gguf_file import read_gguf
from backend.engine.devices import DEVICE_KINDS, build_info, list_devices
from backend.proto import backend_pb2 as pb
from backend.service.options import plan_load
from gallery import hw
from gallery.builds import reinstall_command
from gallery.catalog import load_catalog

RTX_4090 = 'echo "0, GPU-aaaa, NVIDIA GeForce RTX 4090, 24564, 23012"\n'


@pytest.fixture()
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH whose only nvidia-smi reports one RTX 4090 (NVML finds no driver on this machine)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + RTX_4090)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:/bin:/usr/bin")
    monkeypatch.delenv("APEXMTP_VRAM", raising=False)
    return bindir


def test_build_detection_reads_the_registry_without_starting_threads() -> None:
    before = threading.active_count()
    info = build_info()
    assert threading.active_count() == before
    cpu = [d for d in info.devices if d.kind == "cpu"]
    assert cpu and cpu[0].name == "CPU" and cpu[0].backend == "CPU" and cpu[0].total > 0
    assert all(d.kind in DEVICE_KINDS and d.name for d in info.devices)
    assert [d.name for d in list_devices()] == [d.name for d in info.devices]
    # llama_supports_gpu_offload() is also true for an RPC-only build: the local verdict comes from the devices
    assert info.gpu_offload == (bool(info.local_gpus) or info.rpc)
    assert info.cpu_only == (not info.local_gpus and not info.remote_devices)


def test_this_cpu_only_build_is_reported_as_such() -> None:
    info = build_info()
    if info.local_gpus:
        pytest.skip(f"this llama.cpp build has GPU devices: {info.local_gpus}")
    assert info.cpu_only and not info.remote_devices


def test_gpu_the_build_cannot_use_gets_cpu_plans_and_the_cuda_command(fake_nvidia_smi: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    if build_info().local_gpus:
        pytest.skip("this llama.cpp build has a GPU backend")
    assert hw.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in data["hardware"]["gpus"]] == ["NVIDIA GeForce RTX 4090"]
    build = data["build"]
    assert isinstance(build["gpu_offload"], bool) and build["local_gpu"] is False
    assert [d["name"] for d in build["devices"] if d["kind"] == "cpu"] == ["CPU"]
    hint = build["hint"]
    assert "NVIDIA GeForce RTX 4090" in hint and "CUDA" in hint
    assert 'CMAKE_ARGS="-DGGML_RPC=on -DGGML_CUDA=on"' in hint and "--no-cache-dir" in hint
    assert "--no-binary llama-cpp-python" in hint and "llama-cpp-python==0.3.36" in hint
    assert data["budget"]["gpu"] == "no GPU" and not data["budget"]["what_if"]
    for family, row in data["picks"].items():
        assert (row["placement"], row["gpu_layers"], row["what_if"]) == ("cpu", 0, False), family
        assert hint in row["why"] and row["predicted_tok_s"] > 0
    assert hw.main([]) == 0
    text = capsys.readouterr().out
    assert "cannot run layers on a local GPU" in text and "warning: the installed llama.cpp cannot use" in text


def test_vram_what_if_plans_on_the_gpu_and_says_so(fake_nvidia_smi: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hw.main(["--json", "--vram", "24GiB", "--parallel", "4", "--prefer", "speed"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["what_if"] and data["build"]["hint"] is None
    assert data["request"] == {"parallel": 4, "prefer": "speed", "context": None}
    for row in data["picks"].values():
        assert row["what_if"] and row["placement"] != "cpu" and row["objective"] == "speed"
        assert row["why"].startswith("what-if, not detected (24 GiB GPU (given) from --vram): speed first")
        assert "4 slots x" in row["why"] and "parallel:4" in row["options"] and row["slots"] == 4
    assert hw.main(["--vram", "24GiB"]) == 0 and "[what-if]" in capsys.readouterr().out


def test_loadmodel_warns_when_gpu_layers_meet_a_cpu_only_build(fake_nvidia_smi: Path, smollm2_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    if not build_info().cpu_only:
        pytest.skip("this llama.cpp build can offload")
    info = read_gguf(smollm2_path)
    with caplog.at_level(logging.WARNING):
        plan = plan_load(pb.ModelOptions(Model=str(smollm2_path), ContextSize=512, NGPULayers=99), info, smollm2_path)
    assert plan.engine.n_gpu_layers == 99  # the request is kept; llama.cpp runs it on the CPU
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "NGPULayers=99" in warning and "CPU-only" in warning
    assert reinstall_command("nvidia", load_catalog().policy) in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_load(pb.ModelOptions(Model=str(smollm2_path), ContextSize=512, NGPULayers=0), info, smollm2_path)
    assert not [r for r in caplog.records if "CPU-only" in r.getMessage()]
