"""`apexmtp pull REF`: resolve a reference, pick the tier for this machine, download and verify, write the config.

Python API (used by `apexmtp run`): `pull(ref, ...) -> PulledModel`, which carries what the backend's LoadModel
needs. The tier is chosen from gallery facts before downloading (for `parallel` slots of the context each, with
the `prefer` objective); once the GGUF is on disk its own header gives the exact facts and the runtime options are
chosen again from them. A GPU the installed llama.cpp cannot use is reported before the download starts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from backend.core.cli_errors import cli_error
from backend.core.errors import ApexError, InsufficientMemoryError

from .catalog import Catalog, Entry, GalleryFile, load_catalog
from .detect import HardwareProfile, detect
from .download import fetch
from .estimate import ArchFacts, weights_from_gguf
from .modelconfig import build_config, write_config
from .plan import Candidate
from .resolve import HubFile, Resolved, parse_hub_uri, resolve
from .select import OBJECTIVES, Request, Selection, candidates_for, select

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PulledModel:
    """A model ready for the backend: file, LocalAI config, and the `LoadModel` values chosen for this machine."""

    name: str
    model_path: Path
    config_path: Path
    options: list[str]  # ModelOptions.Options strings
    context_size: int
    gpu_layers: int
    cache_type_k: str
    cache_type_v: str
    explanation: str
    sha256: str | None = None  # computed from the file's bytes by this pull (None for a local path)
    parallel: int = 1  # slots the memory plan counts (the options carry `parallel:N` when N > 1)
    predicted_tok_s: float = 0.0  # single-client decode, MTP included where on


def _exact_candidate(path: Path, name: str, tier: str, base_options: tuple[str, ...], mtp_default: bool,
                     mmproj: Path | None = None) -> Candidate:
    from backend.core.gguf_file import read_gguf

    info = read_gguf(path)
    arch = ArchFacts.from_gguf(info)
    return Candidate(name, tier, arch, weights_from_gguf(info, arch), mtp_default and info.has_mtp_head, base_options,
                     mmproj.stat().st_size if mmproj is not None else 0)


def _plan(resolved: Resolved, catalog: Catalog, profile: HardwareProfile, request: Request) -> Selection | None:
    """Tier choice from gallery facts (None when the reference is not a gallery entry)."""
    if resolved.entry is None:
        return None
    cands = candidates_for(catalog, resolved.entry)
    selection = select(profile, cands, catalog.policy, request)
    if not selection.fits and not (request.tier or resolved.pinned):
        raise InsufficientMemoryError(selection.explanation)
    return selection


def pull(
    ref: str,
    *,
    tier: str | None = None,
    models_dir: Path | None = None,
    context: int | None = None,
    profile: HardwareProfile | None = None,
    progress: bool = True,
    catalog: Catalog | None = None,
    mtp: bool | None = None,
    parallel: int = 1,
    prefer: str = "quality",
) -> PulledModel:
    """Resolve `ref`, choose tier and runtime options, download (verified, resumable) and write `<name>.yaml`.

    Args:
        ref: anything `gallery.resolve` accepts (gallery name, owner/repo@Tier, owner/repo@File.gguf, hf:// URI, path).
        tier: force a tier (overrides auto-selection for a family).
        models_dir: where models and configs live (default `backend.core.constants.MODELS_DIR`).
        context: context size to plan for (default: auto, as large as fits).
        profile: hardware to plan for (default: `detect()`).
        progress: show download progress.
        catalog: gallery to use (default: the packaged one).
        mtp: force MTP on/off (default: on when the file has a head and the entry enables it).
        parallel: slots served at once, each with the whole context (memory and auto context count them all).
        prefer: "quality" (the best tier at a usable speed) or "speed" (the fastest good-enough tier).

    Raises:
        EntryNotFoundError, ModelNotFoundError: the reference matches nothing.
        InsufficientMemoryError: auto-selection found no tier that fits (pass `tier` to force one).
        InvalidRequestError: an unknown objective or fewer than one slot.
        UnsafePathError, ChecksumMismatchError, DownloadError: see `gallery.download.fetch`.
    """
    from backend.core import constants

    catalog = catalog or load_catalog()
    models_dir = Path(models_dir or constants.MODELS_DIR).expanduser()
    profile = profile or detect()
    request = Request(context=context, tier=tier, mtp=mtp, parallel=parallel, prefer=prefer)
    resolved = resolve(ref, catalog)
    plan = _plan(resolved, catalog, profile, request)
    if plan is not None and plan.build_hint:
        log.warning("%s", plan.build_hint)  # before a download of many GB that would then run on the CPU
    entry: Entry | None = catalog.get(plan.name) if plan else None
    if resolved.local_path is not None:
        path, model_ref, sha256 = resolved.local_path, str(resolved.local_path), None
    else:
        hub_file, dest, pin = _source(resolved, entry)
        fetched = fetch(hub_file, dest, models_dir=models_dir, sha256=pin, progress=progress)
        path, model_ref, sha256 = fetched.path, dest, fetched.sha256
    mmproj = _fetch_mmproj(entry, models_dir, progress) if resolved.local_path is None else None
    base_options = entry.options if entry else catalog.policy.default_options
    mtp_default = entry is None or "spec_type:draft-mtp" in entry.options
    exact = _exact_candidate(path, resolved.name, entry.tier if entry else "file", base_options, mtp_default, mmproj)
    final = select(profile, [exact], catalog.policy,
                   Request(context=context, mtp=mtp, parallel=parallel, prefer=prefer))
    if not final.fits:
        log.warning("%s", final.explanation)
    config = build_config(
        resolved.name, model_ref, options=final.options, context_size=final.context_size,
        gpu_layers=final.gpu_layers, cache_type_k=final.cache_type_k, cache_type_v=final.cache_type_v,
        flash_attention=final.flash_attention, overrides=entry.overrides if entry else None,
        description=entry.description if entry else "",
    )
    header = f"written by `apexmtp pull {ref}`\n{final.explanation}"
    config_path = write_config(models_dir, config, comment=header)
    return PulledModel(resolved.name, path, config_path, final.options, final.context_size, final.gpu_layers,
                       final.cache_type_k, final.cache_type_v, final.explanation, sha256, parallel,
                       final.predicted_tok_s)


def _fetch_mmproj(entry: Entry | None, models_dir: Path, progress: bool) -> Path | None:
    """The entry's vision projector (`overrides.mmproj`), downloaded and verified like the weights."""
    f = entry.mmproj_file if entry is not None else None
    if entry is None or f is None:
        return None
    return fetch(_hub_file(entry, f), f.filename, models_dir=models_dir, sha256=f.sha256, progress=progress).path


def _hub_file(entry: Entry, f: GalleryFile) -> HubFile:
    """Where one of the entry's files lives on the hub."""
    hub = parse_hub_uri(f.uri)
    if hub is None:
        raise ApexError(f"entry {entry.name}: unsupported uri {f.uri!r} for {f.filename}")
    return hub


def _source(resolved: Resolved, entry: Entry | None) -> tuple[HubFile, str, str | None]:
    """(hub file, destination under the models dir, pinned sha256) for a gallery entry or a bare hub file."""
    if entry is not None:
        f = entry.model_file
        return _hub_file(entry, f), f.filename, f.sha256
    assert resolved.hub_file is not None
    return resolved.hub_file, resolved.hub_file.local_path, None


def main(argv: list[str]) -> int:
    """`apexmtp pull REF [--tier T] [--models-dir D] [--context N] [--parallel N] [--prefer quality|speed]
    [--vram 24GiB] [--ram 64GiB] [--rpc HOST:PORT,...] [--rpc-mem 16GiB,...]`."""
    from .hw import add_rpc_arguments, with_rpc

    parser = argparse.ArgumentParser(prog="apexmtp pull", description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="gallery name, owner/repo@Tier, owner/repo@File.gguf, hf://owner/repo/File.gguf or a path")
    parser.add_argument("--tier", help="force a tier, e.g. I-Balanced (default: best that fits this machine)")
    parser.add_argument("--models-dir", type=Path, help="models directory (default: APEXMTP_MODELS_DIR)")
    parser.add_argument("--context", type=int, help="context per slot to plan for (default: as large as fits)")
    parser.add_argument("--parallel", type=int, default=1, help="slots served at once, each with the whole context "
                        "(default 1; `apexmtp run` serves 4)")
    parser.add_argument("--prefer", choices=OBJECTIVES, default="quality",
                        help="quality: best tier at a usable speed (default); speed: fastest good-enough tier")
    parser.add_argument("--vram", help="assume this much GPU memory (a what-if plan), e.g. 24GiB or 0")
    parser.add_argument("--ram", help="assume this much system RAM (e.g. 64GiB)")
    add_rpc_arguments(parser)
    parser.add_argument("--no-mtp", action="store_true", help="never enable the MTP head")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        profile = with_rpc(detect(vram=args.vram, ram=args.ram), args.rpc, args.rpc_mem)
        pulled = pull(args.ref, tier=args.tier, models_dir=args.models_dir, context=args.context, profile=profile,
                      progress=not args.quiet, mtp=False if args.no_mtp else None, parallel=args.parallel,
                      prefer=args.prefer)
    except ApexError as exc:
        return cli_error(parser.prog, exc)
    print(f"{pulled.name}: {pulled.model_path}")
    if pulled.sha256:
        print(f"sha256: {pulled.sha256} (verified)")
    print(f"config: {pulled.config_path}")
    print(f"options: {' '.join(pulled.options)}")
    print(pulled.explanation)
    return 0
