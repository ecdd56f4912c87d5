"""Turn a model reference into what to fetch: a gallery entry, a file on the hub, or a local GGUF.

Accepted forms (first match wins):

* `huggingface://owner/repo/path/File.gguf`, `hf://...`, `hf.co/owner/repo/...`,
  `https://huggingface.co/owner/repo/resolve/<rev>/path/File.gguf` -> that hub file (gallery entry if we know it);
* an existing local path, or anything starting with `/`, `./`, `../`, `~` or ending in `.gguf` -> local file;
* `gallery@name` (LocalAI's `<gallery>@<entry>`; our gallery is called `apexmtp`) -> that entry;
* `owner/repo@File.gguf` -> that file of the repo; `owner/repo@Tier` (e.g. `@I-Balanced`) -> that tier, from the
  gallery or, for repos it does not list, from the repo's file names (`*-<Tier>.gguf`) via the hub API;
* `owner/repo` -> the gallery family stored in that repo (auto-selects the tier);
* `name` -> the gallery entry of that name (a family auto-selects, a tier entry pins its tier).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backend.core import constants
from backend.core.errors import DownloadError, EntryNotFoundError, ModelNotFoundError

from .catalog import GALLERY_NAME, Catalog, Entry

TIER_FILE_RE = re.compile(r"-((?:I-)?(?:Quality|Balanced|Compact|Mini|Nano|Micro))\.gguf$", re.IGNORECASE)
_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")
_SCHEME_RE = re.compile(r"^(?:huggingface://|hf://|hf\.co/)([^/]+/[^/]+)/(.+)$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubFile:
    """One file in a hub repository."""

    repo: str
    path: str
    revision: str = "main"

    @property
    def uri(self) -> str:
        return f"huggingface://{self.repo}/{self.path}"

    @property
    def local_path(self) -> str:
        """Where it goes under the models dir (LocalAI's convention for llama.cpp models)."""
        return f"llama-cpp/models/{self.repo}/{self.path}"


def hub_endpoint(endpoint: str | None = None) -> str:
    """The hub URL: `endpoint`, else HF_ENDPOINT as set now (huggingface_hub reads it once, at import), else its
    default."""
    from huggingface_hub import constants as hf_constants

    return (endpoint or constants.hf_endpoint() or hf_constants.ENDPOINT).rstrip("/")


def hub_errors() -> tuple[type[Exception], ...]:
    """What a hub request raises when the hub cannot be reached or refuses: OS errors (offline mode, timeouts,
    file-metadata and consistency errors are OSErrors), huggingface_hub's HTTP errors, and the HTTP client's own
    transport errors (the `HTTPError` base HfHubHTTPError shares with them: httpx's, or requests' in older
    releases). Anything else is a bug and should propagate, not turn into "cannot reach the hub"."""
    from huggingface_hub.errors import HfHubHTTPError

    client = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    return (OSError, HfHubHTTPError, *client)


@dataclass(frozen=True)
class Resolved:
    """The outcome of `resolve`: exactly one of `entry`, `hub_file`, `local_path` is set.

    `pinned` is True when the reference fixes the tier (a tier entry, `@Tier`, `@File.gguf`, a URI).
    """

    ref: str
    name: str
    entry: Entry | None = None
    hub_file: HubFile | None = None
    local_path: Path | None = None
    pinned: bool = False


def parse_hub_uri(uri: str) -> HubFile | None:
    """`huggingface://`, `hf://`, `hf.co/` and `https://huggingface.co/.../resolve/<rev>/...` forms, else None."""
    m = _HUB_URL_RE.match(uri)
    if m:
        return HubFile(m.group(1), m.group(3), m.group(2))
    m = _SCHEME_RE.match(uri)
    return HubFile(m.group(1), m.group(2)) if m else None


def config_name(file_name: str) -> str:
    """A LocalAI model name for a file: its stem, lower-case (`Qwen3.6-...-I-Balanced.gguf` -> `qwen3.6-...-i-balanced`)."""
    return PurePosixPath(file_name).name.removesuffix(".gguf").lower()


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or (ref.endswith(".gguf") and "@" not in ref) or Path(ref).exists()


def resolve(ref: str, catalog: Catalog, *, list_repo_files: Callable[[str], list[str]] | None = None) -> Resolved:
    """Resolve `ref` (see the module doc) against `catalog`.

    Args:
        ref: the reference the user typed.
        catalog: the gallery.
        list_repo_files: `repo -> file names`, used only for `owner/repo@Tier` on repos the gallery does not list
            (default: the hub API via huggingface_hub, honouring HF_ENDPOINT / HF_TOKEN).

    Raises:
        EntryNotFoundError: nothing matches (the message says what would).
        ModelNotFoundError: a local path that does not exist.
    """
    ref = ref.strip()
    hub = parse_hub_uri(ref)
    if hub is not None:
        entry = catalog.find_file(hub.repo, hub.path)
        return Resolved(ref, entry.name if entry else config_name(hub.path), entry=entry,
                        hub_file=None if entry else hub, pinned=True)
    if _looks_local(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(path, "not a file; for a hub file use huggingface://owner/repo/File.gguf")
        return Resolved(ref, config_name(path.name), local_path=path.resolve(), pinned=True)
    if "@" in ref:
        left, right = ref.split("@", 1)
        if "/" in left:
            return _resolve_repo_at(ref, left, right, catalog, list_repo_files)
        if left.lower() != GALLERY_NAME:
            raise EntryNotFoundError(f"unknown gallery {left!r} in {ref!r}: this gallery is {GALLERY_NAME!r}")
        ref_name = right
    else:
        ref_name = ref
    if REPO_RE.match(ref_name):
        hub_entry = catalog.hub_for_repo(ref_name)
        if hub_entry is None:
            raise EntryNotFoundError(
                f"{ref_name!r} is not in the gallery: name a file or tier, e.g. {ref_name}@File.gguf or {ref_name}@I-Balanced")
        return Resolved(ref, hub_entry.name, entry=hub_entry)
    entry = catalog.get(ref_name)
    return Resolved(ref, entry.name, entry=entry, pinned=not entry.is_hub)


def _resolve_repo_at(ref: str, repo: str, right: str, catalog: Catalog,
                     list_repo_files: Callable[[str], list[str]] | None) -> Resolved:
    if not REPO_RE.match(repo):
        raise EntryNotFoundError(f"{repo!r} is not owner/repo (in {ref!r})")
    if right.lower().endswith(".gguf"):
        entry = catalog.find_file(repo, right)
        if entry is not None:
            return Resolved(ref, entry.name, entry=entry, pinned=True)
        return Resolved(ref, config_name(right), hub_file=HubFile(repo, right), pinned=True)
    entry = catalog.find_tier(repo, right)
    if entry is not None:
        return Resolved(ref, entry.name, entry=entry, pinned=True)
    files = (list_repo_files or _hub_repo_files)(repo)
    tiers = {m.group(1).lower(): f for f in files if (m := TIER_FILE_RE.search(f))}
    if right.lower() not in tiers:
        known = ", ".join(sorted({m.group(1) for f in tiers.values() if (m := TIER_FILE_RE.search(f))})) or "none"
        raise EntryNotFoundError(f"{repo} has no {right!r} tier (tiers found: {known})")
    path = tiers[right.lower()]
    return Resolved(ref, config_name(path), hub_file=HubFile(repo, path), pinned=True)


def _hub_repo_files(repo: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi(endpoint=hub_endpoint()).list_repo_files(repo)
    except RepositoryNotFoundError:
        raise EntryNotFoundError(f"repository {repo} not found on the hub") from None
    except hub_errors() as exc:
        raise DownloadError(f"cannot list files of {repo} on the hub: {exc}") from exc
