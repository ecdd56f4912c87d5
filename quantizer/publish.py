"""Publish built tiers: model card with the measured numbers, gallery entries in apexmtp's schema, hub upload.

Every tier file is re-checked before anything is written or uploaded (readable GGUF, non-zero header, tier
known), so an aborted quantization is never published. The card and `gallery.yaml` are written next to the
tiers first; the upload is one `create_commit` with those exact files, and `--dry-run` prints the very calls
(`create_repo`, `create_commit` with every `CommitOperationAdd`) instead of making them.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backend.core.errors import QuantizerError
from backend.core.files import sha256_file

from .evaluate import EvalResult, load_json, table
from .quantize import PARTIAL_SUFFIX, check_published
from .recipes import all_tiers

TEMPLATE = Path(__file__).with_name("data") / "model_card.md.j2"
# LocalAI's MTP bundle defaults (MTPSpecOptions in core/config/mtp.go), as the gallery uses them.
MTP_OPTIONS = ("spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75")
_TIER_FILE = re.compile(r"^(?P<model>.+?)-APEX(?P<mtp>-MTP)?-(?P<tier>(?:I-)?[A-Za-z]+)\.gguf$")


@dataclass(frozen=True)
class TierFile:
    """A verified tier GGUF ready to publish, with the byte split the gallery's memory model needs."""

    path: Path
    model: str
    tier: str
    size: int
    sha256: str
    nextn_layers: int
    token_embd_bytes: int
    routed_expert_bytes: int
    mtp_bytes: int
    architecture: str
    embedding_length: int
    trunk_layers: int


def inspect_tier(path: Path) -> TierFile:
    """Verify one tier file and measure it.

    Raises:
        InvalidGGUFError: unreadable, zero header, truncated or unfinished (`.partial`).
        QuantizerError: the name is not `<Model>-APEX[-MTP]-<Tier>.gguf` or the tier is unknown.
    """
    from backend.core.gguf_file import read_gguf

    from .roles import classify

    check_published(path)
    m = _TIER_FILE.match(path.name)
    known = {t.lower(): t for t in all_tiers()}
    if m is None or m.group("tier").lower() not in known:
        raise QuantizerError(f"{path.name}: not an APEX tier file (<Model>-APEX[-MTP]-<Tier>.gguf)")
    info = read_gguf(path)
    trunk = info.trunk_layers
    split = {"token_embd": 0, "routed": 0, "mtp": 0}
    for t in info.tensors:
        role = classify(t.name, trunk)
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= trunk:
            split["mtp"] += t.n_bytes
        elif role is not None and role.role in ("token_embd", "routed"):
            split[role.role] += t.n_bytes
    return TierFile(path, m.group("model"), known[m.group("tier").lower()], path.stat().st_size, sha256_file(path),
                    info.nextn_layers, split["token_embd"], split["routed"], split["mtp"], info.architecture,
                    int(info.arch_key("embedding_length", 0) or 0), trunk)


def find_tier_files(directory: Path) -> list[TierFile]:
    """All tier files in `directory`, verified, best tier first (recipe order). Unfinished outputs are refused."""
    partial = sorted(directory.glob(f"*{PARTIAL_SUFFIX}"))
    if partial:
        raise QuantizerError(f"{directory}: unfinished quantization output {partial[0].name}: finish or delete it")
    files = [inspect_tier(p) for p in sorted(directory.glob("*-APEX-*.gguf"))]
    if not files:
        raise QuantizerError(f"{directory}: no <Model>-APEX-<Tier>.gguf files")
    models = {f.model for f in files}
    if len(models) != 1:
        raise QuantizerError(f"{directory}: tier files of several models ({', '.join(sorted(models))})")
    order = list(all_tiers())
    return sorted(files, key=lambda f: order.index(f.tier))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _entry_name(model: str, mtp: bool, tier: str | None = None) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "-", f"{model}-apex{'-mtp' if mtp else ''}".lower()).strip("-")
    return f"{base}-{tier.lower()}" if tier else base


def architecture_id(f: TierFile) -> str | None:
    """The gallery architecture entry matching a file (architecture, width, trunk depth), if there is one."""
    from gallery.catalog import load_catalog

    for key, facts in load_catalog().architectures.items():
        if (facts.get("general.architecture") == f.architecture and facts.get("embedding_length") == f.embedding_length
                and facts.get("block_count") == f.trunk_layers):
            return key
    return None


def gallery_entries(files: list[TierFile], repo: str, *, license: str, architecture: str, base_model: str | None,
                    results: dict[str, EvalResult], mtp_options: bool = True) -> list[dict[str, Any]]:
    """A hub entry (whose `variants` list the tiers) plus one entry per tier, in the gallery's schema.

    The tag `mtp` and the draft-mtp options appear together, only when the files carry an MTP head and
    `mtp_options` is on (LocalAI's rule: MTP weights alone do not make an entry speculative).
    """
    mtp = files[0].nextn_layers > 0
    speculative = mtp and mtp_options
    model = files[0].model
    family = _entry_name(model, mtp)
    urls = [f"https://huggingface.co/{repo}"] + ([f"https://huggingface.co/{base_model}"] if base_model else [])

    def entry(f: TierFile, name: str, description: str) -> dict[str, Any]:
        filename = f"llama-cpp/models/{repo}/{f.path.name}"
        apex: dict[str, Any] = {
            "family": family, "repo": repo, "tier": f.tier, "architecture": architecture,
            "nextn_predict_layers": f.nextn_layers,
            "bytes": {"total": f.size, "token_embd": f.token_embd_bytes, "routed_experts": f.routed_expert_bytes,
                      "mtp": f.mtp_bytes},
        }
        if f.tier in results:
            apex["kl_mean"] = round(results[f.tier].kl_mean, 6)
            apex["provenance"] = ["kl_mean measured by apexmtp eval against the source"]
        return {
            "name": name, "url": "github:mudler/LocalAI/gallery/virtual.yaml@master", "urls": urls,
            "license": license, "description": description,
            "tags": ["llm", "gguf", "cpu", "gpu", "apex"] + (["mtp"] if speculative else []),
            "size": f"{f.size / 2**30:.2f}GiB",
            "overrides": {"backend": "apexmtp", "known_usecases": ["chat"],
                          "options": ["use_jinja:true", *(MTP_OPTIONS if speculative else ())],
                          "parameters": {"model": filename}},
            "files": [{"filename": filename, "uri": f"huggingface://{repo}/{f.path.name}", "sha256": f.sha256}],
            "apexmtp": apex,
        }

    head = f"{model} quantized with APEX (per-layer MoE precision)" + (
        ", MTP head kept for self-speculative decoding" if mtp else "")
    hub = entry(files[0], family, f"{head}. Pulling this name picks the best tier for the machine.")
    hub["variants"] = [{"model": _entry_name(model, mtp, f.tier)} for f in files]
    return [hub] + [entry(f, _entry_name(model, mtp, f.tier), f"{head}. Tier {f.tier}.") for f in files]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _recipe_table(files: list[TierFile]) -> str:
    tiers = all_tiers()
    rows = []
    for f in files:
        t = tiers[f.tier]
        r, s, a = t.band_types["routed"], t.band_types["shared"], t.band_types["attn"]
        rows.append([f.tier, f"{r['edge']} / {r['near']} / {r['mid']}", f"{s['edge']} / {s['rest']}",
                     f"{a['edge']} / {a['rest']}", t.token_embd, t.output, t.mtp["proj"] if f.nextn_layers else "-",
                     "yes" if t.imatrix else "no"])
    return _md_table(["Tier", "Routed edge/near/mid", "Shared edge/rest", "Attn+SSM edge/rest", "token_embd",
                      "output", "MTP head", "imatrix"], rows)


def model_card(files: list[TierFile], *, license: str, base_model: str | None, results: dict[str, EvalResult],
               eval_meta: dict[str, Any]) -> str:
    """The README.md of the repository (Jinja template in quantizer/data)."""
    import jinja2

    mtp = files[0].nextn_layers > 0
    measured = [results[f.tier] for f in files if f.tier in results]
    if measured:
        tier_table = table(measured + ([results["source"]] if "source" in results else []))
    else:
        tier_table = _md_table(["Tier", "File", "Size"], [[f.tier, f.path.name, _gib(f.size)] for f in files])
    file_table = _md_table(["File", "Bytes", "sha256"], [[f.path.name, f"{f.size:,}", f"`{f.sha256}`"] for f in files])
    tier0 = all_tiers()[files[0].tier]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text()).render(
        license=license, base_model=base_model, model=files[0].model, mtp=mtp, tier_table=tier_table,
        measured=bool(measured), eval_text=eval_meta.get("text", "the shipped evaluation text"),
        n_ctx=eval_meta.get("n_ctx", 512), recipe_table=_recipe_table(files), trunk_layers=files[0].trunk_layers,
        widths=tier0.widths_for(files[0].trunk_layers), example_file=files[0].path.name, file_table=file_table)


def operations(repo: str, files: list[TierFile], extra: list[Path], *, private: bool, message: str) -> list[str]:
    """The hub calls `upload` makes, spelled as Python (what --dry-run prints)."""
    ops = [f"HfApi().create_repo(repo_id={repo!r}, repo_type='model', private={private!r}, exist_ok=True)",
           f"HfApi().create_commit(repo_id={repo!r}, repo_type='model', commit_message={message!r}, operations=["]
    for f in files:
        ops.append(f"    CommitOperationAdd(path_in_repo={f.path.name!r}, path_or_fileobj={str(f.path.resolve())!r}),"
                   f"  # {f.size:,} bytes, sha256 {f.sha256}")
    for p in extra:
        ops.append(f"    CommitOperationAdd(path_in_repo={p.name!r}, path_or_fileobj={str(p.resolve())!r}),")
    ops.append("])")
    return ops


def upload(repo: str, files: list[TierFile], extra: list[Path], *, private: bool, message: str) -> str:
    """Create the repository if needed and push every file in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=f.path.name, path_or_fileobj=str(f.path)) for f in files]
    ops += [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in extra]
    info = api.create_commit(repo_id=repo, repo_type="model", operations=ops, commit_message=message)
    return str(info.commit_url)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `apexmtp publish` arguments."""
    p.add_argument("directory", type=Path, help="directory holding the <Model>-APEX[-MTP]-<Tier>.gguf files")
    p.add_argument("--repo", required=True, help="hub repository, e.g. me/Model-APEX-MTP-GGUF")
    p.add_argument("--eval", type=Path, help="results JSON from `apexmtp eval --json` (adds measured numbers)")
    p.add_argument("--base-model", help="hub id of the original model, for the card and links")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--architecture", help="gallery architecture id (default: matched in gallery/architectures.yaml)")
    p.add_argument("--no-mtp-options", action="store_true", help="do not enable draft-mtp in the gallery entries")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="write card and gallery.yaml, print the hub calls, upload nothing")


def run(args: argparse.Namespace) -> int:
    """Implementation of `apexmtp publish` (see `add_arguments`)."""
    from gallery.catalog import load_catalog
    from gallery.schema import validate_index

    files = find_tier_files(args.directory)
    results: dict[str, EvalResult] = {}
    meta: dict[str, Any] = {}
    if args.eval:
        import json

        results = {r.tier: r for r in load_json(args.eval)}
        meta = json.loads(args.eval.read_text()).get("meta", {})
    arch = args.architecture or architecture_id(files[0])
    entries = gallery_entries(files, args.repo, license=args.license, architecture=arch or files[0].architecture,
                              base_model=args.base_model, results=results, mtp_options=not args.no_mtp_options)
    catalog = load_catalog()
    publishable = [e for e in entries if e["apexmtp"]["tier"] in catalog.tier_order]
    dropped = {e["apexmtp"]["tier"] for e in entries} - {e["apexmtp"]["tier"] for e in publishable}
    if dropped:
        print(f"note: tiers {sorted(dropped)} are not in the gallery's tier order; their files are uploaded "
              "without gallery entries")
        publishable[0]["variants"] = [v for v in publishable[0]["variants"]
                                      if v["model"] in {e["name"] for e in publishable}]
    if arch:
        validate_index(publishable, "gallery.yaml", architectures=catalog.architectures, tiers=catalog.tier_order)
    else:
        print(f"note: no gallery architecture matches {files[0].architecture}; gallery.yaml is not validated "
              "(pass --architecture after adding one to gallery/architectures.yaml)")
    card = args.directory / "README.md"
    card.write_text(model_card(files, license=args.license, base_model=args.base_model, results=results,
                               eval_meta=meta))
    gallery = args.directory / "gallery.yaml"
    gallery.write_text(yaml.safe_dump(publishable, sort_keys=False, width=120))
    extra = [card, gallery] + ([args.eval] if args.eval else [])
    message = f"APEX tiers of {files[0].model}: " + ", ".join(f.tier for f in files)
    if args.dry_run:
        print(f"wrote {card} and {gallery}; would run:")
        print("\n".join(operations(args.repo, files, extra, private=args.private, message=message)))
        return 0
    url = upload(args.repo, files, extra, private=args.private, message=message)
    print(f"uploaded {len(files)} tiers to {args.repo}: {url}")
    return 0
