"""Hardware detection from fake /proc and /sys trees and fake `nvidia-smi` / `sysctl` executables on PATH
(real subprocesses): every probe optional, time-boxed and never fatal; explicit sizes override."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from backend.core import constants
from backend.core.errors import InvalidRequestError
from backend.core.units import GB, GiB, MiB, parse_size
from gallery.detect import detect, parse_nvidia_smi, ram_bandwidth

MEMINFO = "MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   60000000 kB\n"


def _root(tmp_path: Path, meminfo: str = MEMINFO) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(meminfo)
    (root / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Fake CPU 9000\n")
    return root


def _amd_card(root: Path, card: str, vram: int, gtt: int, *, discrete: bool, used: int = 0) -> None:
    dev = root / "sys/class/drm" / card / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1002\n")
    (dev / "mem_info_vram_total").write_text(f"{vram}\n")
    (dev / "mem_info_vram_used").write_text(f"{used}\n")
    (dev / "mem_info_gtt_total").write_text(f"{gtt}\n")
    (dev / "mem_info_gtt_used").write_text("0\n")
    if discrete:
        (dev / "mem_info_vram_vendor").write_text("samsung\n")


def _exe(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection as on a machine without CUDA_VISIBLE_DEVICES, APEXMTP_VRAM or APEXMTP_RAM set."""
    for name in ("CUDA_VISIBLE_DEVICES", "VRAM_OVERRIDE", "RAM_OVERRIDE"):
        monkeypatch.setattr(constants, name, None)


@pytest.fixture()
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only our fake tools (plus /bin for sh and sleep)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:/bin:/usr/bin")
    return bindir


def test_ram_from_meminfo_and_no_gpu(tmp_path: Path, fake_path: Path) -> None:
    p = detect(root=_root(tmp_path), system="Linux", nvml=False)
    assert p.ram_total == 65536000 * 1024 and p.ram_available == 60000000 * 1024
    assert p.cpu == "Fake CPU 9000"
    assert p.gpus == ()
    assert any(n.startswith("nvidia-smi:") for n in p.notes) and "gpu: none found" in p.notes


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_cgroup_limit_caps_ram(tmp_path: Path, fake_path: Path, version: str) -> None:
    root = _root(tmp_path)
    if version == "v2":
        (root / "sys/fs/cgroup").mkdir(parents=True)
        (root / "sys/fs/cgroup/memory.max").write_text(f"{16 * GiB}\n")
        (root / "sys/fs/cgroup/memory.current").write_text(f"{4 * GiB}\n")
    else:
        (root / "sys/fs/cgroup/memory").mkdir(parents=True)
        (root / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(f"{16 * GiB}\n")
        (root / "sys/fs/cgroup/memory/memory.usage_in_bytes").write_text(f"{4 * GiB}\n")
    p = detect(root=root, system="Linux", nvml=False)
    assert (p.ram_total, p.ram_available) == (16 * GiB, 12 * GiB)
    assert any("cgroup" in n for n in p.notes)


def test_cgroup_unlimited_is_ignored(tmp_path: Path, fake_path: Path) -> None:
    root = _root(tmp_path)
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert detect(root=root, system="Linux", nvml=False).ram_total == 65536000 * 1024


def test_nvidia_smi_subprocess(tmp_path: Path, fake_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _exe(fake_path, "nvidia-smi", 'echo "0, GPU-aaaa, NVIDIA GeForce RTX 4090, 24564, 23012"\n'
                                  'echo "1, GPU-bbbb, NVIDIA GeForce RTX 3060, 12288, 11000"\n')
    p = detect(root=_root(tmp_path), system="Linux", nvml=False)
    assert [(g.name, g.total, g.free) for g in p.gpus] == [
        ("NVIDIA GeForce RTX 4090", 24564 * MiB, 23012 * MiB), ("NVIDIA GeForce RTX 3060", 12288 * MiB, 11000 * MiB)]
    assert p.best_gpu.name == "NVIDIA GeForce RTX 4090"
    monkeypatch.setattr(constants, "CUDA_VISIBLE_DEVICES", "GPU-bb")
    only_second = detect(root=_root(tmp_path / "b"), system="Linux", nvml=False)
    assert [g.index for g in only_second.gpus] == [1]
    for hiding in ("-1", ""):  # CUDA shows no device for an empty value either
        monkeypatch.setattr(constants, "CUDA_VISIBLE_DEVICES", hiding)
        assert detect(root=_root(tmp_path / f"c{hiding}"), system="Linux", nvml=False).gpus == ()


def test_nvidia_smi_unified_memory_reports_na() -> None:
    gpus = parse_nvidia_smi("0, GPU-x, NVIDIA GB10, [N/A], [N/A]\n", ram_total=128 * GiB)
    assert gpus[0].unified and gpus[0].total == 128 * GiB and gpus[0].free is None


def test_broken_and_hanging_probes_are_notes_not_errors(tmp_path: Path, fake_path: Path) -> None:
    _exe(fake_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    p = detect(root=_root(tmp_path), system="Linux", nvml=False)
    assert p.gpus == () and any(n.startswith("nvidia-smi: CalledProcessError") for n in p.notes)
    _exe(fake_path, "nvidia-smi", "sleep 5\n")
    p = detect(root=_root(tmp_path / "slow"), system="Linux", nvml=False, timeout=0.3)
    assert p.gpus == () and any("nvidia-smi" in n and ("timed out" in n or "Timeout" in n) for n in p.notes)


def test_missing_proc_is_not_fatal(tmp_path: Path, fake_path: Path) -> None:
    p = detect(root=tmp_path / "empty", system="Linux", nvml=False)
    assert p.ram_total == 0 and any(n.startswith("ram:") for n in p.notes)


def test_amd_discrete_and_apu_rules(tmp_path: Path, fake_path: Path) -> None:
    root = _root(tmp_path)
    _amd_card(root, "card0", 16 * GiB, 32 * GiB, discrete=True, used=1 * GiB)
    _amd_card(root, "card1", 512 * MiB, 48 * GiB, discrete=False)
    (root / "sys/class/drm/card0-DP-1").mkdir(parents=True)  # connector entries are not cards
    p = detect(root=root, system="Linux", nvml=False)
    discrete, apu = p.gpus
    assert (discrete.vendor, discrete.total, discrete.free, discrete.unified) == ("amd", 16 * GiB, 15 * GiB, False)
    assert apu.unified and apu.total == 48 * GiB and apu.free == min(48 * GiB, 60000000 * 1024)


def test_apple_sysctl(tmp_path: Path, fake_path: Path) -> None:
    _exe(fake_path, "sysctl", 'case "$2" in\n  hw.memsize) echo 38654705664 ;;\n'
                              '  machdep.cpu.brand_string) echo "Apple M3 Pro" ;;\n'
                              '  iogpu.wired_limit_mb) echo 0 ;;\nesac\n')
    p = detect(root=_root(tmp_path), system="Darwin")
    gpu = p.gpus[0]
    assert (gpu.vendor, gpu.total, gpu.unified, p.cpu) == ("apple", 36 * GiB, True, "Apple M3 Pro")
    assert gpu.free is None  # no explicit wired limit and no pyobjc here: the selector applies its rule
    _exe(fake_path, "sysctl", 'case "$2" in\n  hw.memsize) echo 38654705664 ;;\n  iogpu.wired_limit_mb) echo 30000 ;;\n'
                              '  *) echo x ;;\nesac\n')
    assert detect(root=_root(tmp_path / "b"), system="Darwin").gpus[0].free == 30000 * MiB


def test_overrides_from_flags_and_env(tmp_path: Path, fake_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _exe(fake_path, "nvidia-smi", 'echo "0, GPU-a, Small GPU, 8192, 8000"\n')
    root = _root(tmp_path)
    p = detect(root=root, system="Linux", nvml=False, vram="24GiB", ram="64GiB")
    assert [(g.total, g.free) for g in p.gpus] == [(24 * GiB, None)]
    assert p.ram_total == 64 * GiB and p.ram_available is None
    assert p.overrides == ("vram=24GiB", "ram=64GiB")
    monkeypatch.setattr(constants, "VRAM_OVERRIDE", 0)  # APEXMTP_VRAM=0
    p = detect(root=root, system="Linux", nvml=False)
    assert p.gpus == ()
    with pytest.raises(InvalidRequestError, match="not a memory size"):
        detect(root=root, system="Linux", nvml=False, vram="lots")


def test_parse_size_forms() -> None:
    assert parse_size("24GiB") == parse_size("24G") == parse_size("24 gib") == 24 * GiB
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 * MiB and parse_size(0) == 0 and parse_size("1.5TiB") == int(1.5 * 1024**4)


def test_live_machine_detection_is_fast_and_safe() -> None:
    p = detect()
    assert p.ram_total > 0 and p.cpu_count >= 1
    assert os.cpu_count() == p.cpu_count


def test_ram_probe_runs_once_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "CACHE_DIR", tmp_path)
    first = ram_bandwidth("test cpu")
    cache = tmp_path / "ram-bandwidth.json"
    assert 0.5 * GB < first < 2000 * GB and cache.is_file()
    stamp = cache.stat().st_mtime_ns
    assert ram_bandwidth("test cpu") == round(first / GB, 2) * GB  # the recorded figure, not a new probe
    assert cache.stat().st_mtime_ns == stamp
    again = ram_bandwidth("test cpu", refresh=True)
    assert again >= round(first / GB, 2) * GB and cache.stat().st_mtime_ns != stamp  # the best probe is kept
