"""`apexmtp hw`: the hardware this machine offers and the tier each gallery family gets here, with the reason."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from backend.errors import ApexError

from .catalog import Catalog, load_catalog
from .detect import HardwareProfile, detect
from .select import Request, budget_for, candidates_for, select
from .units import ctx_label, gib


def picks(profile: HardwareProfile, catalog: Catalog, context: int | None = None) -> dict[str, Any]:
    """`{family: selection row}` for every family of the gallery on `profile`."""
    out = {}
    for hub in catalog.hubs():
        sel = select(profile, candidates_for(catalog, hub), catalog.policy, Request(context=context))
        out[hub.name] = dict(sel.row(), options=sel.options, gpu_layers=sel.gpu_layers)
    return out


def report(profile: HardwareProfile, catalog: Catalog, context: int | None = None) -> dict[str, Any]:
    """Everything `apexmtp hw --json` prints: the profile, the budgets the selector uses, and the picks."""
    budget = budget_for(profile, catalog.policy)
    return {
        "hardware": profile.to_dict(),
        "budget": {"gpu": budget.gpu_label, "gpu_free": budget.gpu_free, "ram_free": budget.ram_free,
                   "unified": budget.unified},
        "picks": picks(profile, catalog, context),
    }


def render(data: dict[str, Any]) -> str:
    """The human-readable form of `report`."""
    hw, budget = data["hardware"], data["budget"]
    lines = [f"CPU: {hw['cpu']} ({hw['cpu_count']} threads), {hw['system']}",
             f"RAM: {gib(hw['ram_total'])} total, {gib(budget['ram_free'])} usable for models"]
    for g in hw["gpus"]:
        free = f", {gib(g['free'])} free" if g["free"] is not None else ""
        kind = " unified" if g["unified"] else ""
        lines.append(f"GPU {g['index']}: {g['name']} ({g['vendor']}{kind}, {gib(g['total'])}{free}; via {g['source']})")
    if not hw["gpus"]:
        lines.append("GPU: none")
    if hw["overrides"]:
        lines.append("given: " + ", ".join(hw["overrides"]))
    lines += [f"  probe: {note}" for note in hw["notes"]]
    lines.append("")
    for family, row in data["picks"].items():
        status = "" if row["fits"] else "  [does not fit]"
        mtp = ", MTP on" if row["mtp"] else ""
        moe = f", experts of {row['n_cpu_moe']} layers in RAM" if row["n_cpu_moe"] else ""
        lines.append(f"{family}: {row['tier']} on {row['placement']}, context {ctx_label(row['context'])}, "
                     f"KV {row['kv']}{mtp}{moe}{status}")
        lines.append(f"  {row['why']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`apexmtp hw [--json] [--vram 24GiB] [--ram 64GiB] [--context N]`."""
    parser = argparse.ArgumentParser(prog="apexmtp hw", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--vram", help="assume this much GPU memory (e.g. 24GiB; 0 = no GPU)")
    parser.add_argument("--ram", help="assume this much system RAM (e.g. 64GiB)")
    parser.add_argument("--context", type=int, help="plan for this context size (default: as large as fits)")
    args = parser.parse_args(argv)
    try:
        profile = detect(vram=args.vram, ram=args.ram)
        data = report(profile, load_catalog(), args.context)
    except ApexError as exc:
        print(f"apexmtp hw: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
