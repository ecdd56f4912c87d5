"""`apexmtp hw`: the hardware this machine offers, what the installed llama.cpp build can run on, and the tier each
gallery family gets here, with the predicted speed and the reason; with `--rpc`, counting RPC workers' memory."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from backend.core.cli_errors import cli_error
from backend.core.endpoints import parse_endpoints
from backend.core.errors import ApexError
from backend.core.units import ctx_label, gib, parse_size

from .builds import gpu_hint, unusable_gpu
from .catalog import Catalog, load_catalog
from .detect import HardwareProfile, add_workers, detect
from .select import OBJECTIVES, Request, budget_for, candidates_for, select


def picks(profile: HardwareProfile, catalog: Catalog, request: Request | None = None) -> dict[str, Any]:
    """`{family: selection row}` for every family of the gallery on `profile`."""
    request = request or Request()
    out = {}
    for hub in catalog.hubs():
        sel = select(profile, candidates_for(catalog, hub), catalog.policy, request)
        out[hub.name] = dict(sel.row(), options=sel.options, gpu_layers=sel.gpu_layers, objective=sel.objective,
                             what_if=sel.what_if, predicted_plain_tok_s=round(sel.speed.plain_tok_s, 1),
                             mtp_k=sel.speed.k, devices=sel.devices())
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
    hardware = {k: v for k, v in profile.to_dict().items() if k not in ("build", "workers")}
    return {
        "hardware": hardware,
        "build": build_block(profile, catalog),
        "rpc": rpc_block(profile),
        "budget": {"gpu": budget.gpu_label, "gpu_free": budget.gpu_free, "ram_free": budget.ram_free,
                   "unified": budget.unified, "what_if": budget.what_if},
        "request": {"parallel": request.parallel, "prefer": request.prefer, "context": request.context},
        "picks": picks(profile, catalog, request),
    }


def rpc_block(profile: HardwareProfile) -> list[dict[str, Any]]:
    """The `rpc` block: each worker with its devices' memory as it reported it (bytes), in the order given."""
    out: dict[str, dict[str, Any]] = {}
    for d in profile.workers:
        worker = out.setdefault(d.endpoint, {"endpoint": d.endpoint, "given": d.given, "devices": []})
        worker["devices"].append({"name": d.name, "free": d.free, "total": d.total})
    return list(out.values())


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
    for w in data["rpc"]:
        devices = ", ".join(f"{d['name']} {gib(d['free'])} free of {gib(d['total'])}" for d in w["devices"])
        lines.append(f"RPC worker {w['endpoint']}{' (given)' if w['given'] else ''}: {devices}")
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
        if row["placement"] == "split":
            lines += [f"    {d['device']}: {d['layers']} layers, {d['weights_gib']:.2f} GiB weights + {d['kv_gib']:.2f} "
                      f"GiB KV + {d['other_gib']:.2f} GiB other = {d['need_gib']:.2f} GiB of {d['free_gib']:.2f} GiB"
                      f"{'' if d['fits'] else '  [does not fit]'}" for d in row["devices"]]
    return "\n".join(lines)


def add_rpc_arguments(parser: argparse.ArgumentParser, *, live: bool = True) -> None:
    """`--rpc HOST:PORT,...` (live workers, asked for their memory; `live=False` where the caller already has it)
    and `--rpc-mem SIZE,...` (what-if workers)."""
    if live:
        parser.add_argument("--rpc", type=parse_endpoints, default=(), metavar="HOST:PORT,...",
                            help="plan with these RPC workers (`apexmtp worker`), asked over RPC for their memory")
    parser.add_argument("--rpc-mem", metavar="SIZE,...",
                        help="plan with what-if workers of these sizes, e.g. 16GiB,16GiB (no worker needed)")


def with_rpc(profile: HardwareProfile, endpoints: tuple[str, ...], rpc_mem: str | None) -> HardwareProfile:
    """`profile` with the workers of `--rpc` (queried) and `--rpc-mem` (what-if sizes).

    Raises:
        WorkerUnreachableError: a worker did not answer; InvalidRequestError: a malformed size.
    """
    sizes = tuple(parse_size(x) for x in (rpc_mem or "").split(",") if x.strip())
    return add_workers(profile, endpoints, sizes) if endpoints or sizes else profile


def main(argv: list[str]) -> int:
    """`apexmtp hw [--json] [--vram 24GiB] [--ram 64GiB] [--rpc HOST:PORT,...] [--rpc-mem 16GiB,...] [--context N]
    [--parallel N] [--prefer quality|speed]`."""
    parser = argparse.ArgumentParser(prog="apexmtp hw", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--vram", help="assume this much GPU memory: a what-if plan (e.g. 24GiB; 0 = no GPU)")
    parser.add_argument("--ram", help="assume this much system RAM (e.g. 64GiB)")
    add_rpc_arguments(parser)
    parser.add_argument("--context", type=int, help="context per slot to plan for (default: as large as fits)")
    parser.add_argument("--parallel", type=int, default=1, help="slots served at once, each with the whole context "
                        "(default 1; `apexmtp run` serves 4)")
    parser.add_argument("--prefer", choices=OBJECTIVES, default="quality",
                        help="quality: best tier at a usable speed (default); speed: fastest good-enough tier")
    args = parser.parse_args(argv)
    try:
        profile = with_rpc(detect(vram=args.vram, ram=args.ram), args.rpc, args.rpc_mem)
        data = report(profile, load_catalog(), Request(context=args.context, parallel=args.parallel,
                                                        prefer=args.prefer))
    except ApexError as exc:
        return cli_error(parser.prog, exc)
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
