"""The REF grammar of `apexmtp pull` / `run`: gallery names, gallery@name, owner/repo@Tier (gallery or hub listing),
owner/repo@File.gguf, huggingface:// / hf:// URIs and local paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakehub import FakeHub

from backend.core.errors import DownloadError, EntryNotFoundError, ModelNotFoundError
from gallery.catalog import load_catalog
from gallery.resolve import HubFile, parse_hub_uri, resolve

CAT = load_catalog()


def _no_listing(repo: str) -> list[str]:
    raise AssertionError(f"gallery refs must not list {repo} on the hub")


@pytest.mark.parametrize(
    ("ref", "name", "pinned"),
    [
        ("qwen3.6-35b-a3b-apex-mtp", "qwen3.6-35b-a3b-apex-mtp", False),
        ("Qwen3.6-35B-A3B-APEX-MTP", "qwen3.6-35b-a3b-apex-mtp", False),
        ("apexmtp@qwen3.6-35b-a3b-apex-i-mini", "qwen3.6-35b-a3b-apex-i-mini", True),
        ("mudler/Qwen3.6-35B-A3B-APEX-GGUF", "qwen3.6-35b-a3b-apex", False),
        ("mudler/Qwen3.6-35B-A3B-APEX-GGUF@I-Balanced", "qwen3.6-35b-a3b-apex-i-balanced", True),
        ("mudler/Qwen3.6-35B-A3B-APEX-MTP-GGUF@i-nano", "qwen3.6-35b-a3b-apex-mtp-i-nano", True),
        ("mudler/Qwen3.5-35B-A3B-APEX-GGUF@Qwen3.5-35B-A3B-APEX-Balanced.gguf", "qwen3.5-35b-a3b-apex-balanced", True),
        ("huggingface://mudler/Qwen3.6-35B-A3B-APEX-GGUF/Qwen3.6-35B-A3B-APEX-I-Compact.gguf",
         "qwen3.6-35b-a3b-apex-i-compact", True),
        ("https://huggingface.co/mudler/Qwen3.6-35B-A3B-APEX-GGUF/resolve/main/Qwen3.6-35B-A3B-APEX-I-Mini.gguf",
         "qwen3.6-35b-a3b-apex-i-mini", True),
    ],
)
def test_gallery_references(ref: str, name: str, pinned: bool) -> None:
    r = resolve(ref, CAT, list_repo_files=_no_listing)
    assert (r.name, r.pinned, r.hub_file, r.local_path) == (name, pinned, None, None)
    assert r.entry.name == name


def test_owner_repo_at_tier_resolves_to_the_right_file() -> None:
    r = resolve("mudler/Qwen3.6-35B-A3B-APEX-GGUF@I-Balanced", CAT, list_repo_files=_no_listing)
    assert r.entry.model_file.filename == (
        "llama-cpp/models/mudler/Qwen3.6-35B-A3B-APEX-GGUF/Qwen3.6-35B-A3B-APEX-I-Balanced.gguf")
    assert r.entry.model_file.sha256 == "cc62ad396e94c783b6fd233d59c2fe5a88e3bdb807e37efd130de350f35d49a2"


def test_tier_of_a_repo_the_gallery_does_not_list_comes_from_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: b"GGUF" for name in ("Other-APEX-I-Quality.gguf", "Other-APEX-I-Balanced.gguf",
                                         "sub/Other-APEX-Mini.gguf", "README.md", "mmproj.gguf")}
    with FakeHub({"someone/Other-APEX-GGUF": files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = resolve("someone/Other-APEX-GGUF@i-balanced", CAT)
        assert r.hub_file == HubFile("someone/Other-APEX-GGUF", "Other-APEX-I-Balanced.gguf")
        assert r.name == "other-apex-i-balanced" and r.entry is None and r.pinned
        assert resolve("someone/Other-APEX-GGUF@Mini", CAT).hub_file.path == "sub/Other-APEX-Mini.gguf"
        assert any(x.path.startswith("/api/models/someone/Other-APEX-GGUF") for x in hub.log)
        with pytest.raises(EntryNotFoundError, match=r"no 'I-Nano' tier \(tiers found: I-Balanced, I-Quality, Mini\)"):
            resolve("someone/Other-APEX-GGUF@I-Nano", CAT)
        with pytest.raises(EntryNotFoundError, match="repository someone/Missing-GGUF not found"):
            resolve("someone/Missing-GGUF@I-Nano", CAT)



def test_hub_files_outside_the_gallery() -> None:
    r = resolve("someone/Repo-GGUF@Model-Q4_K_M.gguf", CAT, list_repo_files=_no_listing)
    assert r.hub_file == HubFile("someone/Repo-GGUF", "Model-Q4_K_M.gguf") and r.name == "model-q4_k_m"
    assert r.hub_file.local_path == "llama-cpp/models/someone/Repo-GGUF/Model-Q4_K_M.gguf"
    assert resolve("hf://someone/Repo-GGUF/dir/M.gguf", CAT).hub_file == HubFile("someone/Repo-GGUF", "dir/M.gguf")
    assert parse_hub_uri("https://huggingface.co/a/b/resolve/v1.0/c.gguf") == HubFile("a/b", "c.gguf", "v1.0")
    assert parse_hub_uri("hf.co/a/b/c.gguf") == HubFile("a/b", "c.gguf")
    assert parse_hub_uri("qwen3") is None


def test_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "My-Model.gguf"
    model.write_bytes(b"GGUF")
    r = resolve(str(model), CAT)
    assert (r.local_path, r.name, r.entry) == (model, "my-model", None)
    monkeypatch.chdir(tmp_path)
    assert resolve("./My-Model.gguf", CAT).local_path == model
    assert resolve("My-Model.gguf", CAT).local_path == model
    with pytest.raises(ModelNotFoundError):
        resolve("./missing.gguf", CAT)
    assert os.path.isabs(resolve("My-Model.gguf", CAT).local_path)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("localai@qwen3-4b", "unknown gallery 'localai'"),
        ("someone/Unknown-GGUF", "not in the gallery: name a file or tier"),
        ("qwen3.6-35b-a3b-apx", "did you mean"),
        ("no/such/thing@X", "is not owner/repo"),
    ],
)
def test_errors_say_what_would_work(ref: str, message: str) -> None:
    with pytest.raises(EntryNotFoundError, match=message):
        resolve(ref, CAT, list_repo_files=_no_listing)


def test_listing_errors_a_user_can_act_on_and_bugs_that_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that cannot be reached is a DownloadError; a programming error below the listing propagates as itself."""
    import huggingface_hub

    def failing(error: Exception):
        def list_repo_files(self, repo: str) -> list[str]:
            raise error
        return list_repo_files

    ref = "someone/Other-APEX-GGUF@I-Balanced"
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", failing(ConnectionError("refused")))
    with pytest.raises(DownloadError, match="cannot list files.*refused"):
        resolve(ref, CAT)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", failing(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        resolve(ref, CAT)
