"""`apexmtp plan | imatrix | quantize | eval | publish`: the quantizer's command-line verbs.

Each `*_main(argv)` builds its own parser and returns an exit code; errors from `backend.core.errors` become one
line on stderr and exit code 1 (2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.core.cli_errors import cli_error
from backend.core.errors import ApexError

from .evaluate import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVAL_TEXT

if TYPE_CHECKING:
    from .imatrix_file import Imatrix

log = logging.getLogger(__name__)


def _run(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    # llama.cpp's own chatter (unused-tensor notices, loader lines) would drown the output.
    logging.getLogger("llama.cpp").setLevel(logging.ERROR)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        return fn(args)
    except ApexError as exc:
        return cli_error(parser.prog, exc)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _add_bands(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bands", choices=["fixed", "scaled"], default="fixed",
                   help="layer bands: upstream APEX widths (5/5/rest, attention 3) or scaled with depth")


# ----------------------------------------------------------------------------------------------- plan


def plan_main(argv: list[str]) -> int:
    """`apexmtp plan SRC --tier T [-o FILE] [--json FILE] [--check FILE]`"""
    p = argparse.ArgumentParser(prog="apexmtp plan", description=(
        "Print the per-tensor APEX type plan of a GGUF as anchored, escaped `pattern=type` rules (stdout, or -o "
        "FILE) usable by `llama-quantize --tensor-type-file`; a summary goes to stderr."))
    p.add_argument("source", type=Path, help="GGUF whose tensor table is planned (only the header is read)")
    p.add_argument("--tier", required=True, help="one tier, e.g. I-Balanced")
    _add_bands(p)
    p.add_argument("-o", "--output", type=Path, help="write the rules here instead of stdout")
    p.add_argument("--json", type=Path, help="also write the full per-tensor plan as JSON")
    p.add_argument("--check", type=Path, metavar="TYPE_FILE",
                   help="compare an existing tensor-type file (first match wins, as llama-quantize) with the plan")
    p.add_argument("--verify", action="store_true",
                   help="also run llama.cpp's quantizer in dry-run mode and check it picks every planned type")
    return _run(_plan, p, argv)


def _plan(args: argparse.Namespace) -> int:
    from .plan import ModelLayout, build_plan, first_match_types, parse_type_file
    from .recipes import get_tier

    layout = ModelLayout.from_gguf(args.source)
    plan = build_plan(layout, get_tier(args.tier, args.bands))
    text = plan.to_type_file()
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    err = sys.stderr
    print(f"# {layout.name}: {layout.architecture}, {layout.trunk_layers} trunk + {layout.nextn_layers} MTP layers, "
          f"tier {plan.tier.name} ({args.bands} bands)", file=err)
    for role, band, typ, n, nbytes in plan.summary():
        print(f"#   {role:<11} {band:<5} {typ:<8} {n:>5} tensors {nbytes / 2**20:>11.2f} MiB", file=err)
    print(f"# {len(plan.rules)} rules cover {len(plan.quantized)} quantized tensors; "
          f"{len(plan.imatrix_tensors)} need imatrix data; predicted size {plan.predicted_bytes():,} bytes "
          f"({plan.predicted_bytes() / 2**30:.3f} GiB)", file=err)
    if args.json:
        rows = [{"name": t.name, "role": t.role, "layer": t.layer, "band": t.band, "source_type": t.source_type,
                 "type": t.target_type, "bytes": t.n_bytes, "needs_imatrix": t.needs_imatrix} for t in plan.tensors]
        args.json.write_text(json.dumps({"tier": plan.tier.name, "predicted_bytes": plan.predicted_bytes(),
                                         "rules": [str(r) for r in plan.rules], "tensors": rows}, indent=1) + "\n")
    if args.verify:
        from .quantize import llama_dry_run

        chosen = llama_dry_run(args.source, plan)
        wrong = [t.name for t in plan.tensors if chosen.get(t.name) != t.target_type]
        print(f"# llama.cpp dry run: {len(plan.tensors) - len(wrong)}/{len(plan.tensors)} tensors as planned"
              + (f"; differs: {', '.join(wrong[:5])}" if wrong else ""), file=err)
        if wrong:
            return 1
    if args.check:
        theirs = first_match_types(layout, parse_type_file(args.check.read_text()))
        diff = [(n, t, plan.type_of(n)) for n, t in theirs.items() if t != plan.type_of(n)]
        for name, t, ours in diff:
            print(f"# differs: {name}: {args.check.name} gives {t or 'base-ftype default'}, plan {ours}", file=err)
        print(f"# {args.check.name}: {len(theirs) - len(diff)}/{len(theirs)} tensors agree with the plan", file=err)
        return 1 if diff else 0
    return 0


# -------------------------------------------------------------------------------------------- imatrix


def imatrix_main(argv: list[str]) -> int:
    """`apexmtp imatrix SRC [--calibration TXT] [-o imatrix.gguf] [--ctx N] [--chunks N] [--no-mtp]`"""
    p = argparse.ArgumentParser(prog="apexmtp imatrix", description=(
        "Collect an importance matrix with llama.cpp on a calibration text, the MTP head included (hidden rows "
        "mirrored into an MTP context as speculative decoding does), and write llama.cpp's imatrix GGUF."))
    p.add_argument("source", type=Path, help="BF16/F16 GGUF (the source the tiers are built from)")
    p.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION_TEXT,
                   help="calibration text (default: the one shipped with apexmtp)")
    p.add_argument("-o", "--output", type=Path, default=Path("imatrix.gguf"))
    _add_collect_args(p)
    p.add_argument("--tier", help="also report coverage of the tensors this tier needs imatrix data for")
    _add_bands(p)
    p.add_argument("--verbose", action="store_true", help="print every tensor's coverage")
    return _run(_imatrix, p, argv)


def _add_collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, help="use at most this many chunks")
    p.add_argument("--no-mtp", action="store_true", help="do not collect the MTP head")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: physical cores)")


def _collect(source: Path, calibration: Path, args: argparse.Namespace, out: Path) -> Imatrix:
    from tqdm import tqdm

    from .imatrix import collect_imatrix
    from .imatrix_file import write_imatrix

    text = calibration.read_text(encoding="utf-8")
    as_json = getattr(args, "progress", "bar") == "json"
    with tqdm(desc="imatrix", unit="chunk", file=sys.stderr, disable=True if as_json else None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            _emit(args, {"event": "progress", "tier": "imatrix", "stage": "collecting",
                         "percent": round(100 * done / total, 1), "message": f"chunk {done}/{total}"})

        im = collect_imatrix(source, text, dataset=calibration.name, n_ctx=args.ctx, n_chunks=args.chunks,
                             mtp=not args.no_mtp, n_threads=args.threads, progress=progress)
    write_imatrix(out, im)
    im.path = str(out)
    return im


def _imatrix(args: argparse.Namespace) -> int:
    from .imatrix_file import coverage_report
    from .plan import ModelLayout, build_plan
    from .recipes import get_tier

    im = _collect(args.source, args.calibration, args, args.output)
    layout = ModelLayout.from_gguf(args.source)
    tier = get_tier(args.tier or "I-Balanced", args.bands)  # which tensors get quantized does not depend on it
    plan = build_plan(layout, tier)
    report = coverage_report(im, ((t.name, t.imatrix_size) for t in plan.quantized))
    mtp = [r for r in report if (n := _layer(r[0])) is not None and n >= layout.trunk_layers]
    ok = [r for r in report if r[1] == "ok"]
    for name, status, cov in report if args.verbose else ():
        print(f"{name:<44} {status:<8} {100 * cov:6.1f}% of experts")
    print(f"wrote {args.output}: {len(im.entries)} weights, {im.chunk_count} chunks x {im.chunk_size} tokens")
    print(f"coverage: {len(ok)}/{len(report)} quantized tensors have data "
          f"(token_embd/output never do: lookups, or the LM head without --process-output); "
          f"MTP head: {sum(r[1] == 'ok' for r in mtp)}/{len(mtp)}")
    if args.tier:
        need = {t.name for t in plan.imatrix_tensors}
        missing = [r[0] for r in report if r[0] in need and r[1] != "ok"]
        print(f"{tier.name}: {len(need) - len(missing)}/{len(need)} IQ tensors covered" +
              (f"; missing: {', '.join(missing[:6])}" if missing else ""))
        return 1 if missing else 0
    return 0


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None


# ------------------------------------------------------------------------------------------- quantize


def quantize_main(argv: list[str]) -> int:
    """`apexmtp quantize SRC --tier I-Balanced,I-Compact [--imatrix F | --calibration TXT] -o DIR`"""
    p = argparse.ArgumentParser(prog="apexmtp quantize", description=(
        "Build APEX tiers from a BF16/F16/F32 GGUF with llama.cpp. I- tiers use an importance matrix: --imatrix, "
        "or one collected now from --calibration (default: the shipped text) and saved next to the outputs."))
    p.add_argument("source", type=Path)
    p.add_argument("--tier", required=True, help="comma list of tiers, or 'all' (e.g. I-Balanced,I-Compact)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--imatrix", type=Path, help="importance matrix (llama.cpp GGUF or legacy .dat)")
    group.add_argument("--calibration", type=Path, help="collect the imatrix from this text")
    p.add_argument("-o", "--output-dir", type=Path, required=True)
    _add_bands(p)
    _add_collect_args(p)
    p.add_argument("--allow-requantize", action="store_true", help="accept an already-quantized source")
    p.add_argument("--overwrite", action="store_true", help="replace existing tier files")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress display; json prints one event per line on stdout (for job runners)")
    return _run(_quantize, p, argv)


def _progress_fn(mode: str, tier: str) -> tuple[Callable[[str, float, str], None], Callable[[], None]]:
    from tqdm import tqdm

    if mode == "json":
        def emit(stage: str, frac: float, msg: str) -> None:
            print(json.dumps({"event": "progress", "tier": tier, "stage": stage, "percent": round(100 * frac, 1),
                              "message": msg}), flush=True)
        return emit, lambda: None
    bar = tqdm(total=100, desc=tier, unit="%", file=sys.stderr, disable=True if mode == "none" else None,
               bar_format="{desc:<12} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def update(stage: str, frac: float, msg: str) -> None:
        bar.update(max(0.0, 100 * frac - bar.n))

    return update, bar.close


def _quantize(args: argparse.Namespace) -> int:
    from .imatrix_file import read_imatrix
    from .quantize import model_stem, quantize_tier
    from .recipes import parse_tiers

    tiers = parse_tiers(args.tier, args.bands)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    im = None
    if any(t.imatrix for t in tiers):
        if args.imatrix:
            im = read_imatrix(args.imatrix)
        else:
            out = args.output_dir / f"{model_stem(args.source)}.imatrix.gguf"
            im = _collect(args.source, args.calibration or DEFAULT_CALIBRATION_TEXT, args, out)
            _emit(args, {"event": "imatrix", "path": str(out), "weights": len(im.entries)})
    for tier in tiers:
        update, close = _progress_fn(args.progress, tier.name)
        try:
            r = quantize_tier(args.source, tier, args.output_dir, im, nthread=args.threads,
                              allow_requantize=args.allow_requantize, overwrite=args.overwrite, progress=update)
        except ApexError as exc:
            _emit(args, {"event": "error", "tier": tier.name, "message": str(exc)})
            raise
        finally:
            close()
        _emit(args, {"event": "done", "tier": r.tier, "path": str(r.path), "size_bytes": r.size_bytes,
                     "predicted_bytes": r.predicted_bytes, "seconds": round(r.seconds, 2)})
        if args.progress != "json":
            print(f"{r.tier:<11} {r.path.name}  {r.size_bytes / 2**20:10.2f} MiB  "
                  f"(predicted {100 * r.prediction_error:+.4f}%)  {r.seconds:6.1f} s")
    return 0


def _emit(args: argparse.Namespace, event: dict[str, object]) -> None:
    if getattr(args, "progress", "bar") == "json":
        print(json.dumps(event), flush=True)


# ----------------------------------------------------------------------------------------------- eval


def eval_main(argv: list[str]) -> int:
    """`apexmtp eval SRC TIER.gguf... [--text TXT] [--json F] [--plot F.png]`"""
    p = argparse.ArgumentParser(prog="apexmtp eval", description=(
        "Evaluate tiers against their source: perplexity, KL divergence (mean/median/p99.9/max), top-1 "
        "agreement, size and MTP acceptance at k=1..4, as a Markdown table (+ JSON, PNG plot of KL vs size)."))
    p.add_argument("source", type=Path)
    p.add_argument("tiers", type=Path, nargs="*", help="tier GGUFs (default: none, i.e. the source against itself)")
    p.add_argument("--text", type=Path, default=DEFAULT_EVAL_TEXT, help="evaluation text (default: shipped)")
    p.add_argument("--ctx", type=int, default=512, help="context per chunk, passed to both models (default 512)")
    p.add_argument("--chunks", type=int, help="use at most this many chunks")
    p.add_argument("--mtp-k", default="1,2,3,4", help="draft lengths for MTP acceptance ('' to skip)")
    p.add_argument("--no-source", action="store_true", help="leave the source's own row out")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG of KL vs size (needs matplotlib)")
    return _run(_eval, p, argv)


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, plot, table, to_json

    cands = ([] if args.no_source else [args.source]) + list(args.tiers)
    ks = tuple(int(k) for k in args.mtp_k.split(",") if k.strip())
    results = evaluate(args.source, cands, args.text.read_text(encoding="utf-8"), n_ctx=args.ctx,
                       n_chunks=args.chunks, mtp_ks=ks, n_threads=args.threads,
                       progress=lambda m: print(m, file=sys.stderr))
    print(table(results), end="")
    if args.json:
        to_json(results, args.json, {"source": str(args.source), "text": args.text.name, "n_ctx": args.ctx})
    if args.plot:
        plot(results, args.plot, title=f"{args.source.name}: KL vs size")
    return 0


# -------------------------------------------------------------------------------------------- publish


def publish_main(argv: list[str]) -> int:
    """`apexmtp publish DIR --repo OWNER/NAME [--eval eval.json] [--dry-run]`"""
    from .publish import add_arguments, run

    p = argparse.ArgumentParser(prog="apexmtp publish", description=(
        "Write the model card (tier table with measured numbers) and gallery entries for the tier files in DIR, "
        "and upload them through huggingface_hub; --dry-run prints the exact hub operations instead."))
    add_arguments(p)
    return _run(run, p, argv)
