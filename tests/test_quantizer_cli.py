"""The quantizer's CLI verbs end to end on a tiny synthetic model, and `apexmtp publish --dry-run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from backend.cli import main
from backend.synth.qwen35moe import SynthConfig, write_model
from quantizer.plan import parse_type_file

CONFIG = SynthConfig(n_layer=6, n_expert=4, n_expert_used=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A source and two tiers built through `apexmtp quantize` (imatrix collected from the shipped text)."""
    d = tmp_path_factory.mktemp("cli")
    src = write_model(d / "Tiny-F16.gguf", CONFIG, mode="predictable", dtype="f16")
    out = d / "out"
    rc = main(["quantize", str(src), "--tier", "I-Balanced,Compact", "-o", str(out), "--bands", "scaled",
               "--ctx", "128", "--chunks", "3", "--progress", "none"])
    assert rc == 0
    return src, out


def test_quantize_cli_writes_tiers_and_imatrix(built: tuple[Path, Path]) -> None:
    _, out = built
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Tiny-APEX-MTP-Compact.gguf", "Tiny-APEX-MTP-I-Balanced.gguf", "Tiny.imatrix.gguf"]


def test_quantize_cli_json_progress(built: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    src, out = built
    rc = main(["quantize", str(src), "--tier", "I-Nano", "-o", str(tmp_path), "--bands", "scaled",
               "--imatrix", str(out / "Tiny.imatrix.gguf"), "--progress", "json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "progress" and events[-1]["event"] == "done"
    assert events[-1]["tier"] == "I-Nano" and Path(events[-1]["path"]).exists()
    assert abs(events[-1]["size_bytes"] - events[-1]["predicted_bytes"]) < 0.005 * events[-1]["size_bytes"]


def test_quantize_cli_refuses_plain_mini(built: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = built
    assert main(["quantize", str(src), "--tier", "Mini", "-o", str(tmp_path)]) == 1
    assert "use I-Mini" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_plan_cli_prints_rules_and_checks_a_file(built: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = built
    assert main(["plan", str(src), "--tier", "I-Compact", "--json", str(tmp_path / "p.json"), "--verify"]) == 0
    out = capsys.readouterr()
    assert re.search(r"llama.cpp dry run: (\d+)/\1 tensors as planned", out.err)
    rules = parse_type_file(out.out)
    assert rules and all(r.pattern.startswith("^") and r.pattern.endswith("$") for r in rules)
    assert "predicted size" in out.err and "MTP layers" in out.err
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["tier"] == "I-Compact" and len(plan["tensors"]) > 100
    (tmp_path / "mine.txt").write_text(out.out)
    assert main(["plan", str(src), "--tier", "I-Compact", "--check", str(tmp_path / "mine.txt")]) == 0
    (tmp_path / "upstream.txt").write_text("blk.0.ffn_up_exps=q8_0\n")
    assert main(["plan", str(src), "--tier", "I-Compact", "--check", str(tmp_path / "upstream.txt")]) == 1
    assert "differs: blk.0.ffn_up_exps.weight" in capsys.readouterr().err


def test_imatrix_cli_reports_mtp_coverage(built: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = built
    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(src), "-o", str(out), "--ctx", "128", "--chunks", "2", "--tier", "I-Nano",
                 "--bands", "scaled"]) == 0
    text = capsys.readouterr().out
    # 12 quantizable head tensors; nextn.shared_head_head is the head's own LM head, which (like output.weight)
    # only runs for drafted tokens, never while mirroring, so it has no data; its recipe type needs none.
    assert out.exists() and "MTP head: 11/12" in text and "I-Nano: 12/12 IQ tensors covered" in text


def test_eval_cli_table_json_plot(built: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    src, out = built
    rc = main(["eval", str(src), str(out / "Tiny-APEX-MTP-Compact.gguf"), "--ctx", "128", "--chunks", "2",
               "--mtp-k", "1", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| source |" in table and "| Compact |" in table and "MTP acc k=1" in table
    assert json.loads((tmp_path / "e.json").read_text())["results"][1]["tier"] == "Compact"
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_publish_dry_run(built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = built
    ev = tmp_path / "eval.json"
    assert main(["eval", str(src), *map(str, sorted(out.glob("*APEX*.gguf"))), "--ctx", "128", "--chunks", "1",
                 "--mtp-k", "", "--json", str(ev)]) == 0
    capsys.readouterr()
    assert main(["publish", str(out), "--repo", "me/Tiny-APEX-MTP-GGUF", "--eval", str(ev), "--dry-run",
                 "--architecture", "qwen35moe-35b-a3b"]) == 0
    printed = capsys.readouterr().out
    assert "HfApi().create_repo(repo_id='me/Tiny-APEX-MTP-GGUF'" in printed
    assert "CommitOperationAdd(path_in_repo='Tiny-APEX-MTP-I-Balanced.gguf'" in printed
    assert "CommitOperationAdd(path_in_repo='README.md'" in printed
    card = (out / "README.md").read_text()
    assert "| I-Balanced |" in card and "KL mean" in card
    entries = yaml.safe_load((out / "gallery.yaml").read_text())
    hub, *tiers = entries
    assert [v["model"] for v in hub["variants"]] == ["tiny-apex-mtp-i-balanced", "tiny-apex-mtp-compact"]
    for e in entries:
        assert ("mtp" in e["tags"]) == ("spec_type:draft-mtp" in e["overrides"]["options"]) is True
        assert len(e["files"][0]["sha256"]) == 64 and e["apexmtp"]["bytes"]["mtp"] > 0
    assert tiers[0]["apexmtp"]["kl_mean"] >= 0
    assert main(["publish", str(out), "--repo", "me/Tiny-APEX-MTP-GGUF", "--dry-run", "--no-mtp-options",
                 "--architecture", "qwen35moe-35b-a3b"]) == 0
    assert all("mtp" not in e["tags"] for e in yaml.safe_load((out / "gallery.yaml").read_text()))


def test_publish_refuses_unfinished_output(built: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "Tiny-APEX-MTP-Compact.gguf.partial").write_bytes(b"\0" * 64)
    assert main(["publish", str(tmp_path), "--repo", "me/x", "--dry-run"]) == 1
    assert "unfinished" in capsys.readouterr().err
