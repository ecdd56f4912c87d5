"""The gallery's YAML files: they validate, follow LocalAI's schema and rules, and broken copies fail loudly with
errors that name the file, the entry and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from backend.core.errors import EntryNotFoundError, SchemaError
from gallery.catalog import DATA_DIR, load_catalog, reload_catalog
from gallery.modelconfig import tags_for
from gallery.schema import MTP_OPTION

FAMILIES = ("qwen3.5-35b-a3b-apex", "qwen3.6-35b-a3b-apex", "qwen3.6-35b-a3b-apex-mtp")


@pytest.fixture()
def data_copy(tmp_path: Path) -> Path:
    for name in ("index.yaml", "architectures.yaml", "hardware.yaml"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    return tmp_path


def _edit_index(data_dir: Path, edit) -> None:
    path = data_dir / "index.yaml"
    entries = yaml.safe_load(path.read_text())
    edit(entries)
    path.write_text(yaml.safe_dump(entries, sort_keys=False))


def test_shipped_gallery_validates_and_has_the_three_families() -> None:
    catalog = load_catalog()
    assert [e.name for e in catalog.hubs()] == list(FAMILIES)
    mtp = catalog.family_tiers(catalog.get("qwen3.6-35b-a3b-apex-mtp"))
    assert [e.tier for e in mtp][:3] == ["I-Balanced", "Balanced", "I-Quality"]
    assert {e.tier for e in mtp} >= {"I-Quality", "I-Balanced", "I-Compact", "I-Mini", "I-Nano"}


def test_entries_follow_localai_conventions() -> None:
    catalog = load_catalog()
    for e in catalog.entries.values():
        f = e.model_file
        assert f.filename == f"llama-cpp/models/{e.repo}/{e.file_name}", e.name
        assert f.uri == f"huggingface://{e.repo}/{e.file_name}", e.name
        assert e.overrides["backend"] == "apexmtp"
        assert "use_jinja:true" in e.options
        assert ("mtp" in e.tags) == (MTP_OPTION in e.options) == (e.nextn_predict_layers > 0), e.name
        assert e.weights.other > 0, e.name


def test_pins_match_the_shared_facts() -> None:
    """Every sha256 in index.yaml is one that LocalAI's index pins for the same file."""
    from conftest import APEX_FACTS

    facts = yaml.safe_load((APEX_FACTS / "apex-files.yaml").read_text())
    pins = {f["file"]: f["sha256"] for r in facts["repos"] for f in r["files"]}
    for e in load_catalog().entries.values():
        if e.model_file.sha256:
            assert pins[e.file_name] == e.model_file.sha256, e.name


def test_tags_rule_helper() -> None:
    assert tags_for(["use_jinja:true", MTP_OPTION], ["llm", "mtp"]) == ["llm", "mtp"]
    assert tags_for(["use_jinja:true", "spec_type:none"], ["llm", "mtp"]) == ["llm"]
    assert tags_for([MTP_OPTION], ["llm"]) == ["llm", "mtp"]


@pytest.mark.parametrize(
    ("edit", "entry", "field"),
    [
        (lambda es: es[1].__setitem__("tags", [t for t in es[1]["tags"] if t != "apex"] + ["mtp"]),
         "qwen3.5-35b-a3b-apex-i-quality", "tags"),
        (lambda es: es[1]["files"][0].__setitem__("filename", "../../etc/passwd"),
         "qwen3.5-35b-a3b-apex-i-quality", "files[0].filename"),
        (lambda es: es[1]["files"][0].__setitem__("sha256", "xyz"), "qwen3.5-35b-a3b-apex-i-quality", "files[0].sha256"),
        (lambda es: es[1]["apexmtp"].__setitem__("tier", "Q4_K_M"), "qwen3.5-35b-a3b-apex-i-quality", "apexmtp.tier"),
        (lambda es: es[1]["apexmtp"]["bytes"].__setitem__("routed_experts", 10**12),
         "qwen3.5-35b-a3b-apex-i-quality", "apexmtp.bytes"),
        (lambda es: es[0]["variants"].append({"model": "nope"}), "qwen3.5-35b-a3b-apex", "variants[7].model"),
        (lambda es: es[2].__setitem__("name", es[1]["name"]), "qwen3.5-35b-a3b-apex-i-quality", "name"),
        (lambda es: es[1]["overrides"]["parameters"].__setitem__("model", "other.gguf"),
         "qwen3.5-35b-a3b-apex-i-quality", "overrides.parameters.model"),
        (lambda es: es[1]["apexmtp"].__setitem__("architecture", "llama"), "qwen3.5-35b-a3b-apex-i-quality",
         "apexmtp.architecture"),
    ],
)
def test_schema_errors_name_file_entry_and_field(data_copy: Path, edit, entry: str, field: str) -> None:
    _edit_index(data_copy, edit)
    with pytest.raises(SchemaError) as err:
        reload_catalog(data_copy)
    assert (err.value.source, err.value.entry, err.value.field) == ("index.yaml", entry, field)
    assert "index.yaml" in str(err.value) and entry in str(err.value)


def test_hardware_and_architecture_errors(data_copy: Path) -> None:
    hw = yaml.safe_load((data_copy / "hardware.yaml").read_text())
    hw["classes"][3]["vram"] = "lots"
    (data_copy / "hardware.yaml").write_text(yaml.safe_dump(hw))
    with pytest.raises(SchemaError, match=r"hardware.yaml: entry 'gpu-8g', field 'vram'"):
        reload_catalog(data_copy)
    shutil.copy(DATA_DIR / "hardware.yaml", data_copy / "hardware.yaml")
    archs = yaml.safe_load((data_copy / "architectures.yaml").read_text())
    del archs["architectures"]["qwen35moe-35b-a3b"]["attention.key_length"]
    (data_copy / "architectures.yaml").write_text(yaml.safe_dump(archs))
    with pytest.raises(SchemaError, match=r"entry 'qwen35moe-35b-a3b', field 'attention.key_length': missing"):
        reload_catalog(data_copy)


def test_yaml_syntax_error_names_the_line(data_copy: Path) -> None:
    (data_copy / "index.yaml").write_text("- name: x\n  tags: [a, b\n")
    with pytest.raises(SchemaError, match=r"index.yaml.*line"):
        reload_catalog(data_copy)


def test_lookup_errors_suggest_names() -> None:
    catalog = load_catalog()
    with pytest.raises(EntryNotFoundError, match="did you mean"):
        catalog.get("qwen3.6-35b-a3b-apex-mtp-i-balance")
    assert catalog.find_tier("MUDLER/qwen3.6-35b-a3b-apex-gguf", "i-mini").name == "qwen3.6-35b-a3b-apex-i-mini"
    assert {e.name for e in catalog.search("mtp-i-nano")} == {"qwen3.6-35b-a3b-apex-mtp-i-nano"}


def test_every_35b_a3b_entry_can_see() -> None:
    """The Qwen3.5/3.6-35B-A3B entries, the MTP ones included, carry the base model's vision projector (the MTP repo
    ships none; the head does not change the vision tower or the embedding width), pinned as the sibling repo pins it."""
    from conftest import APEX_FACTS

    facts = yaml.safe_load((APEX_FACTS / "apex-files.yaml").read_text())
    pins = {f"huggingface://{r['repo']}/{r['mmproj']['file']}": r["mmproj"]["sha256"]
            for r in facts["repos"] if r.get("mmproj")}
    entries = [e for e in load_catalog().entries.values()
               if e.name.startswith(("qwen3.5-35b-a3b-apex", "qwen3.6-35b-a3b-apex"))]
    assert sum("mtp" in e.name for e in entries) == 9
    for e in entries:
        proj = e.mmproj_file
        assert proj is not None and "vision" in e.overrides["known_usecases"], e.name
        assert pins[proj.uri] == proj.sha256, e.name
