"""`apexmtp hw`: the hardware this machine offers, what the installed llama.cpp build can run on, and the tier each
gallery family gets here, with the predicted speed and the reason."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from backend.errors import ApexError

from .builds import gpu_hint, unusable_gpu
from .catalog import Catalog, load_catalog
from .detect import HardwareProfile, detect
from .select import OBJECTIVES, Request, budget_for, candidates_for, select
from .units import ctx_label, gib


def picks(profile: HardwareProfile, catalog: Catalog, request: Request | None = None) -> dict[str, Any]:
    """`{family: selection row}` for every family of the gallery on `profile`."""
    request = request or Request()
    out = {}
    for hub in catalog.hubs():
        sel = select(profile, candidates_for(catalog, hub), catalog.policy, request)
        out[hub.name] = dict(sel.row(), options=sel.options, gpu_layers=sel.gpu_layers, objective=sel.objective,
                             what_if=sel.what_if, predicted_plain_tok_s=round(sel.speed.plain_tok_s, 1),
                             mtp_k=sel.speed.k)
    return out


def build_block(profile: HardwareProfile, catalog: Catalog) -> dict[str, Any]:
    """The `build` block: llama.cpp's own answers (None when not probed) and the reinstall hint for a GPU it
    cannot use."""
    blocked = unusable_gpu(profile)
    build = profile.build
    return {
        "gpu_offload": build.gpu_offload if build else None,
        "rpc": build.rpc if build else None,
        "local_gpu": bool(build.local_gpus) if build else None,
        "devices": [dict(asdict(d), remote=d.remote) for d in build.devices] if build else [],
        "hint": gpu_hint(blocked, catalog.policy) if blocked else None,
    }


def report(profile: HardwareProfile, catalog: Catalog, request: Request | None = None) -> dict[str, Any]:
    """Everything `apexmtp hw --json` prints: the profile, the build, the budgets the selector uses, the picks."""
    request = request or Request()
    budget = budget_for(profile, catalog.policy)
    hardware = {k: v for k, v in profile.to_dict().items() if k != "build"}
    return {
        "hardware": hardware,
        "build": build_block(profile, catalog),
        "budget": {"gpu": budget.gpu_label, "gpu_free": budget.gpu_free, "ram_free": budget.ram_free,
                   "unified": budget.unified, "what_if": budget.what_if},
        "request": {"parallel": request.parallel, "prefer": request.prefer, "context": request.context},
        "picks": picks(profile, catalog, request),
    }


def render(data: dict[str, Any]) -> str:
    """The human-readable form of `report`."""
    hw, budget, build = data["hardware"], data["budget"], data["build"]
    bandwidth = f", {hw['ram_bandwidth'] / 1e9:.0f} GB/s measured" if hw.get("ram_bandwidth") else ""
    lines = [f"CPU: {hw['cpu']} ({hw['cpu_count']} threads), {hw['system']}",
             f"RAM: {gib(hw['ram_total'])} total, {gib(budget['ram_free'])} usable for models{bandwidth}"]
    for g in hw["gpus"]:
        free = f", {gib(g['free'])} free" if g["free"] is not None else ""
        kind = " unified" if g["unified"] else ""
        lines.append(f"GPU {g['index']}: {g['name']} ({g['vendor']}{kind}, {gib(g['total'])}{free}; via {g['source']})")
    if not hw["gpus"]:
        lines.append("GPU: none")
    if build["gpu_offload"] is not None:
        devices = ", ".join(f"{d['name']} ({d['kind']}{', remote' if d['remote'] else ''})" for d in build["devices"])
        lines.append(f"llama.cpp build: {'can' if build['local_gpu'] else 'cannot'} run layers on a local GPU; "
                     f"RPC {'on' if build['rpc'] else 'off'}; devices: {devices or 'none'}")
    if build["hint"]:
        lines.append(f"  warning: {build['hint']}")
    if hw["overrides"]:
        lines.append("given: " + ", ".join(hw["overrides"]) + (" (what-if plans)" if budget["what_if"] else ""))
    lines += [f"  probe: {note}" for note in hw["notes"]]
    req = data["request"]
    lines.append(f"\nplans for {req['parallel']} slot{'s' if req['parallel'] > 1 else ''}, objective {req['prefer']}:")
    for family, row in data["picks"].items():
        status = "" if row["fits"] else "  [does not fit]"
        mtp = ", MTP on" if row["mtp"] else ""
        moe = f", experts of {row['n_cpu_moe']} layers in RAM" if row["n_cpu_moe"] else ""
        what_if = " [what-if]" if row["what_if"] else ""
        lines.append(f"{family}: {row['tier']} on {row['placement']}, context {ctx_label(row['context'])}, "
                     f"KV {row['kv']}{mtp}{moe}, ~{row['predicted_tok_s']:g} tok/s{status}{what_if}")
        lines.append(f"  {row['why']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`apexmtp hw [--json] [--vram 24GiB] [--ram 64GiB] [--context N] [--parallel N] [--prefer quality|speed]`."""
    parser = argparse.ArgumentParser(prog="apexmtp hw", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--vram", help="assume this much GPU memory: a what-if plan (e.g. 24GiB; 0 = no GPU)")
    parser.add_argument("--ram", help="assume this much system RAM (e.g. 64GiB)")
    parser.add_argument("--context", type=int, help="context per slot to plan for (default: as large as fits)")
    parser.add_argument("--parallel", type=int, default=1, help="slots served at once, each with the whole context "
                        "(default 1; `apexmtp run` serves 4)")
    parser.add_argument("--prefer", choices=OBJECTIVES, default="quality",
                        help="quality: best tier at a usable speed (default); speed: fastest good-enough tier")
    args = parser.parse_args(argv)
    try:
        profile = detect(vram=args.vram, ram=args.ram)
        data = report(profile, load_catalog(), Request(context=args.context, parallel=args.parallel,
                                                        prefer=args.prefer))
    except ApexError as exc:
        print(f"apexmtp hw: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
