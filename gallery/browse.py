"""`apexmtp gallery list|search Q|show NAME|refresh|table`: browse the gallery and maintain its data.

`refresh` is the maintainers' command: it asks the hub API (`model_info(files_metadata=True)`, honouring HF_ENDPOINT
and HF_TOKEN) for every repository in index.yaml and writes the real sizes and LFS sha256 into the entries,
replacing the INFERRED sizes. `table` checks (or with `--write` regenerates) the committed selection table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from backend.core.cli_errors import cli_error
from backend.core.errors import ApexError
from backend.core.units import GiB, gib

from .catalog import DATA_DIR, Catalog, Entry, load_catalog, load_yaml, reload_catalog
from .resolve import hub_endpoint, parse_hub_uri

HubSizes = dict[str, tuple[int, str | None]]  # file path in repo -> (size, lfs sha256)


def _line(e: Entry) -> str:
    kind = "family" if e.is_hub else e.tier
    return f"{e.name:48s} {kind:10s} {gib(e.weights.total):>9s}  {','.join(t for t in e.tags if t in ('mtp', 'apex'))}"


def show(e: Entry, catalog: Catalog) -> str:
    """A readable description of one entry: facts, file, options, and the tiers of a family."""
    lines = [e.name, f"  {e.description}", f"  repo: {e.repo}   license: {e.license}   tags: {', '.join(e.tags)}"]
    if e.is_hub:
        lines.append("  tiers (best quality first; `apexmtp pull` picks the best that fits):")
        lines += [f"    {t.tier:10s} {gib(t.weights.total):>9s}  {t.name}" for t in catalog.family_tiers(e)]
    else:
        f = e.model_file
        kl = f"   KL mean vs BF16: {e.kl_mean}" if e.kl_mean is not None else ""
        lines += [f"  tier: {e.tier}   size: {gib(e.weights.total)}{kl}",
                  f"  file: {f.filename}", f"  from: {f.uri}", f"  sha256: {f.sha256 or '(hub LFS sha256, checked at download)'}"]
    lines.append(f"  options: {' '.join(e.options)}")
    lines += [f"  note: {p}" for p in e.raw["apexmtp"].get("provenance", [])]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- refresh


def hub_sizes(repo: str, endpoint: str | None = None) -> HubSizes:
    """`{path: (size, lfs_sha256)}` for every file of `repo`, from the hub's model API."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub_endpoint(endpoint)).model_info(repo, files_metadata=True)
    return {s.rfilename: (int(s.size or 0), getattr(s.lfs, "sha256", None) if s.lfs else None) for s in info.siblings or ()}


def refresh_entries(entries: list[dict[str, Any]], lookup: Callable[[str], HubSizes]) -> list[str]:
    """Update sizes and sha256 of `entries` in place from `lookup(repo)`; return one line per change or problem."""
    cache: dict[str, HubSizes] = {}
    report = []
    for e in entries:
        f = e["files"][0]
        hub = parse_hub_uri(f["uri"])
        if hub is None:
            continue
        if hub.repo not in cache:
            cache[hub.repo] = lookup(hub.repo)
        found = cache[hub.repo].get(hub.path)
        if found is None:
            report.append(f"{e['name']}: {hub.path} is not in {hub.repo} (left unchanged)")
            continue
        size, sha = found
        report += _apply(e, size, sha)
    return report


def _apply(e: dict[str, Any], size: int, sha: str | None) -> list[str]:
    changes = []
    f, sizes = e["files"][0], e["apexmtp"]["bytes"]
    if sha and f.get("sha256") != sha:
        changes.append(f"{e['name']}: sha256 {f.get('sha256') or '(none)'} -> {sha}")
        f["sha256"] = sha
    if size and sizes["total"] != size:
        if sizes["token_embd"] + sizes["routed_experts"] + sizes["mtp"] > size:
            return changes + [f"{e['name']}: hub size {size} is below the inferred split; fix bytes by hand"]
        changes.append(f"{e['name']}: size {sizes['total']} -> {size}")
        sizes["total"] = size
        e["size"] = f"{size / GiB:.1f}GiB"
        notes = [n for n in e["apexmtp"].get("provenance", []) if not n.startswith("total")]
        e["apexmtp"]["provenance"] = ["total exact: hub API (apexmtp gallery refresh)", *notes]
    return changes


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_index(path: Path, entries: list[dict[str, Any]]) -> None:
    """Rewrite index.yaml keeping its leading comment block."""
    header = "".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if line.startswith("#")) if path.is_file() else ""
    body = yaml.dump(entries, Dumper=_NoAliases, sort_keys=False, width=119, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(_leading_comments(header) + body, encoding="utf-8")
    tmp.replace(path)


def _leading_comments(text: str) -> str:
    return text if text.endswith("\n") or not text else text + "\n"


def refresh(data_dir: Path, *, endpoint: str | None = None, dry_run: bool = False) -> list[str]:
    """Refresh sizes/sha256 of every entry in `data_dir/index.yaml` from the hub; validate before writing."""
    path = data_dir / "index.yaml"
    entries = load_yaml(path)
    report = refresh_entries(entries, lambda repo: hub_sizes(repo, endpoint))
    if not dry_run and report:
        write_index(path, entries)
        reload_catalog(data_dir)  # fails loudly (SchemaError) if the refreshed file breaks the schema
    return report


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    """`apexmtp gallery list | search Q | show NAME | refresh [--dry-run] | table [--write]`."""
    parser = argparse.ArgumentParser(prog="apexmtp gallery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every entry: name, tier, size")
    sub.add_parser("search", help="entries matching all words").add_argument("query", nargs="+")
    sub.add_parser("show", help="one entry in detail").add_argument("name")
    p_refresh = sub.add_parser("refresh", help="(maintainers) sizes and sha256 from the hub API into index.yaml")
    p_refresh.add_argument("--dry-run", action="store_true")
    p_refresh.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p_table = sub.add_parser("table", help="check (or --write) the committed selection table")
    p_table.add_argument("--write", action="store_true")
    p_table.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ApexError as exc:
        return cli_error(parser.prog, exc)


def _run(args: argparse.Namespace) -> int:
    from .table import build_table, table_drift, write_table

    if args.cmd == "refresh":
        for line in refresh(args.data_dir, dry_run=args.dry_run) or ["index.yaml is up to date"]:
            print(line)
        return 0
    catalog = load_catalog()
    if args.cmd == "list":
        print("\n".join(_line(e) for e in catalog.entries.values()))
    elif args.cmd == "search":
        found = catalog.search(" ".join(args.query))
        print("\n".join(_line(e) for e in found) if found else "no entry matches")
        return 0 if found else 1
    elif args.cmd == "show":
        print(show(catalog.get(args.name), catalog))
    elif args.cmd == "table":
        if args.json:
            print(json.dumps(build_table(catalog), indent=2))
        elif args.write:
            print(f"wrote {write_table(catalog)}")
        else:
            drift = table_drift(catalog)
            print(drift or "selection.yaml matches the selector")
            return 1 if drift else 0
    return 0
