"""`pull` end to end against the fake hub with a small test gallery of synthetic qwen35moe GGUFs; the CLI verbs
(`apexmtp pull`, `apexmtp hw`, `apexmtp gallery ...`) on top of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from fakehub import FakeHub

from backend.core.errors import ChecksumMismatchError, InsufficientMemoryError
from backend.core.gguf_file import read_gguf
from backend.core.units import GiB
from backend.synth.qwen35moe import PRESETS, write_model
from gallery import browse, hw
from gallery import pull as pull_mod
from gallery.catalog import DATA_DIR, load_catalog, reload_catalog
from gallery.detect import HardwareProfile
from gallery.estimate import ArchFacts, weights_from_gguf
from gallery.pull import pull
from gallery.table import build_table

REPO = "test/Tiny-APEX-MTP-GGUF"
TIERS = ("I-Quality", "I-Mini")
CPU_16G = HardwareProfile("Linux", "test cpu", 4, 16 * GiB, None)
TINY_ARCH = {
    "description": "synthetic tiny qwen35moe (backend.synth.qwen35moe PRESETS['tiny'])", "general.architecture": "qwen35moe",
    "block_count": 4, "context_length": 4096, "embedding_length": 256, "vocab_size": 512, "attention.head_count": 4,
    "attention.head_count_kv": 2, "attention.key_length": 64, "attention.value_length": 64,
    "full_attention_interval": 4, "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 256,
    "expert_shared_feed_forward_length": 256, "ssm.conv_kernel": 4, "ssm.state_size": 32, "ssm.group_count": 2,
    "ssm.time_step_rank": 4, "ssm.inner_size": 128,
}


def _entry(name: str, tier: str, path: Path, *, hub: bool = False) -> dict:
    info = read_gguf(path)
    w = weights_from_gguf(info, ArchFacts.from_gguf(info))
    fname = f"Tiny-APEX-MTP-{tier}.gguf"
    local = f"llama-cpp/models/{REPO}/{fname}"
    options = ["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75"]
    return {
        "name": name, "url": "github:mudler/LocalAI/gallery/virtual.yaml@master", "urls": [f"https://huggingface.co/{REPO}"],
        "license": "apache-2.0", "description": f"tiny test model, {tier}", "tags": ["llm", "gguf", "mtp"],
        "size": f"{w.total / GiB:.3f}GiB",
        "overrides": {"backend": "apexmtp", "known_usecases": ["chat"], "options": options,
                      "parameters": {"model": local, "temperature": 0.7, "top_k": 20}},
        "files": [{"filename": local, "uri": f"huggingface://{REPO}/{fname}",
                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}],
        "apexmtp": {"family": "tiny-apex-mtp", "repo": REPO, "tier": tier, "architecture": "synthetic-tiny",
                    "nextn_predict_layers": 1, "bytes": {"total": w.total, "token_embd": w.token_embd,
                                                          "routed_experts": w.routed_experts, "mtp": w.mtp}},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    cfg = replace(PRESETS["tiny"], mtp=True)
    return {t: write_model(root / f"Tiny-APEX-MTP-{t}.gguf", cfg, dtype="f16", seed=i) for i, t in enumerate(TIERS)}


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    d = tmp_path_factory.mktemp("gallery")
    shutil.copy(DATA_DIR / "hardware.yaml", d / "hardware.yaml")
    (d / "architectures.yaml").write_text(yaml.safe_dump({"architectures": {"synthetic-tiny": TINY_ARCH}}))
    tiers = [_entry(f"tiny-apex-mtp-{t.lower()}", t, models[t]) for t in TIERS]
    hub = dict(tiers[0], name="tiny-apex-mtp", variants=[{"model": e["name"]} for e in tiers])
    (d / "index.yaml").write_text("# test gallery\n" + yaml.safe_dump([hub, *tiers], sort_keys=False))
    return d


@pytest.fixture()
def hub(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    files = {f"Tiny-APEX-MTP-{t}.gguf": p.read_bytes() for t, p in models.items()}
    with FakeHub({REPO: files}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def test_pull_family_picks_downloads_verifies_and_writes_the_config(hub: FakeHub, gallery_dir: Path,
                                                                   models: dict[str, Path], tmp_path: Path) -> None:
    catalog = reload_catalog(gallery_dir)
    pulled = pull("tiny-apex-mtp", models_dir=tmp_path, profile=CPU_16G, progress=False, catalog=catalog)
    assert pulled.name == "tiny-apex-mtp"
    assert pulled.model_path == tmp_path / f"llama-cpp/models/{REPO}/Tiny-APEX-MTP-I-Quality.gguf"
    assert pulled.model_path.read_bytes() == models["I-Quality"].read_bytes()
    assert pulled.options == ["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75"]
    assert (pulled.context_size, pulled.gpu_layers, pulled.cache_type_k) == (4096, 0, "f16")  # CPU plans keep f16 KV (hardware.yaml cache_type_cpu)
    assert "I-Quality with MTP on the CPU" in pulled.explanation
    text = pulled.config_path.read_text()
    assert pulled.config_path == tmp_path / "tiny-apex-mtp.yaml" and text.startswith("# written by `apexmtp pull")
    config = yaml.safe_load(text)
    assert config["backend"] == "apexmtp" and config["name"] == "tiny-apex-mtp"
    assert config["parameters"] == {"model": f"llama-cpp/models/{REPO}/Tiny-APEX-MTP-I-Quality.gguf",
                                    "temperature": 0.7, "top_k": 20}
    assert (config["context_size"], config["gpu_layers"], config["flash_attention"]) == (4096, 0, "on")
    assert config["options"] == pulled.options and config["template"] == {"use_tokenizer_template": True}
    n = len(hub.log)
    again = pull("tiny-apex-mtp", models_dir=tmp_path, profile=CPU_16G, progress=False, catalog=catalog)
    assert again.model_path == pulled.model_path and len(hub.log) == n  # already there: no request


def test_pull_owner_repo_at_tier_and_explicit_tier(hub: FakeHub, gallery_dir: Path, tmp_path: Path) -> None:
    catalog = reload_catalog(gallery_dir)
    a = pull(f"{REPO}@I-Mini", models_dir=tmp_path, profile=CPU_16G, progress=False, catalog=catalog)
    assert a.name == "tiny-apex-mtp-i-mini" and a.model_path.name == "Tiny-APEX-MTP-I-Mini.gguf"
    b = pull("tiny-apex-mtp", tier="I-Mini", models_dir=tmp_path / "b", profile=CPU_16G, progress=False,
             catalog=catalog, mtp=False, context=2048)
    assert b.model_path.name == "Tiny-APEX-MTP-I-Mini.gguf" and "spec_type:none" in b.options
    assert b.context_size == 2048


def test_pull_refuses_a_machine_where_nothing_fits(hub: FakeHub, gallery_dir: Path, tmp_path: Path) -> None:
    tiny_box = HardwareProfile("Linux", "cpu", 1, 64 * 1024 * 1024, 0)
    with pytest.raises(InsufficientMemoryError, match="nothing fits"):
        pull("tiny-apex-mtp", models_dir=tmp_path, profile=tiny_box, progress=False, catalog=reload_catalog(gallery_dir))
    assert hub.gets(".gguf") == []


def test_pull_rejects_corrupt_bytes_and_writes_nothing(hub: FakeHub, gallery_dir: Path, models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    data = bytearray(models["I-Quality"].read_bytes())
    data[-1] ^= 1
    hub.serve_instead["Tiny-APEX-MTP-I-Quality.gguf"] = bytes(data)
    hub.repos[REPO]["Tiny-APEX-MTP-I-Quality.gguf"] = bytes(models["I-Quality"].read_bytes())
    with pytest.raises(ChecksumMismatchError):
        pull("tiny-apex-mtp-i-quality", models_dir=tmp_path, profile=CPU_16G, progress=False,
             catalog=reload_catalog(gallery_dir))
    assert list(tmp_path.rglob("*.gguf")) == [] and list(tmp_path.glob("*.yaml")) == []


def test_pull_hub_file_outside_the_gallery(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    pulled = pull(f"hf://{REPO}/Tiny-APEX-MTP-I-Mini.gguf", models_dir=tmp_path, profile=CPU_16G, progress=False)
    assert pulled.name == "tiny-apex-mtp-i-mini"
    assert pulled.model_path == tmp_path / f"llama-cpp/models/{REPO}/Tiny-APEX-MTP-I-Mini.gguf"
    assert "spec_type:draft-mtp" in pulled.options  # the file has a head, so MTP is on


def test_pull_cli_reports_the_sha256_it_computed(hub: FakeHub, models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`apexmtp pull` prints the digest of the bytes on disk, also for a file that was there already (and bad)."""
    good = hashlib.sha256(models["I-Mini"].read_bytes()).hexdigest()
    args = [f"hf://{REPO}/Tiny-APEX-MTP-I-Mini.gguf", "--models-dir", str(tmp_path), "--vram", "0", "--ram", "8GiB",
            "--quiet"]
    assert pull_mod.main(args) == 0 and f"sha256: {good} (verified)" in capsys.readouterr().out
    dest = tmp_path / f"llama-cpp/models/{REPO}/Tiny-APEX-MTP-I-Mini.gguf"
    dest.write_bytes(dest.read_bytes()[:-1] + b"\1")
    assert pull_mod.main(args) == 0 and f"sha256: {good} (verified)" in capsys.readouterr().out
    assert dest.read_bytes() == models["I-Mini"].read_bytes() and len(hub.gets("Tiny-APEX-MTP-I-Mini.gguf")) == 2


def test_pull_local_file_and_cli(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pulled = pull(str(models["I-Mini"]), models_dir=tmp_path, profile=CPU_16G, progress=False)
    assert pulled.model_path == models["I-Mini"] and pulled.name == "tiny-apex-mtp-i-mini"
    assert yaml.safe_load(pulled.config_path.read_text())["parameters"]["model"] == str(models["I-Mini"])
    rc = pull_mod.main([str(models["I-Mini"]), "--models-dir", str(tmp_path / "cli"), "--vram", "0", "--ram", "8GiB",
                        "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "config:" in out and "on the CPU" in out
    assert pull_mod.main(["./missing.gguf", "--models-dir", str(tmp_path)]) == 1
    assert "model file not found" in capsys.readouterr().err


def test_hw_json_agrees_with_the_committed_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The table's gpu-24g tier and placement; the speeds (and with them MTP and the experts kept in RAM) differ,
    since a given card has a default bandwidth and this machine's RAM its measured one."""
    assert hw.main(["--json", "--vram", "24GiB", "--ram", "64GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = build_table(load_catalog())
    for family, row in data["picks"].items():
        expected = table[family]["gpu-24g"]["quality"]
        assert [row[k] for k in ("tier", "fits", "placement", "kv", "gpu_free_gib", "ram_free_gib")] == \
            [expected[k] for k in ("tier", "fits", "placement", "kv", "gpu_free_gib", "ram_free_gib")]
        assert row["what_if"] and row["why"].startswith("what-if, not detected")
    assert hw.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "qwen3.6-35b-a3b-apex-mtp:" in out


def test_gallery_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert browse.main(["list"]) == 0 and "qwen3.6-35b-a3b-apex-mtp-i-nano" in capsys.readouterr().out
    assert browse.main(["show", "qwen3.6-35b-a3b-apex-i-balanced"]) == 0
    out = capsys.readouterr().out
    assert "cc62ad396e94c783b6fd233d59c2fe5a88e3bdb807e37efd130de350f35d49a2" in out and "KL mean" in out
    assert browse.main(["search", "3.5", "compact"]) == 0 and "qwen3.5-35b-a3b-apex-i-compact" in capsys.readouterr().out
    assert browse.main(["show", "nope"]) == 1 and "no gallery entry" in capsys.readouterr().err
    assert browse.main(["table"]) == 0 and "matches" in capsys.readouterr().out


def test_refresh_takes_sizes_and_sha256_from_the_hub_api(hub: FakeHub, gallery_dir: Path, models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    d = tmp_path / "g"
    shutil.copytree(gallery_dir, d)
    entries = yaml.safe_load((d / "index.yaml").read_text())
    entries[1]["files"][0].pop("sha256")
    entries[1]["apexmtp"]["bytes"]["total"] += 4096
    (d / "index.yaml").write_text("# test gallery\n" + yaml.safe_dump(entries, sort_keys=False))
    report = browse.refresh(d)
    assert any("sha256 (none) ->" in line for line in report) and any("size" in line for line in report)
    fixed = reload_catalog(d).get("tiny-apex-mtp-i-quality")
    assert fixed.model_file.sha256 == hashlib.sha256(models["I-Quality"].read_bytes()).hexdigest()
    assert fixed.weights.total == models["I-Quality"].stat().st_size  # the hub's size is the file's
    assert fixed.raw["apexmtp"]["provenance"][0].startswith("total exact")
    assert (d / "index.yaml").read_text().startswith("# test gallery\n")
    assert browse.refresh(d) == []  # idempotent
