"""What the web page of `apexmtp run` shows, as data: the gallery with fit verdicts, the status, /metrics, pulls.

Pure functions over the gallery, the hardware profile and the backend's Status/GetMetrics replies, plus `PullJob`
(one verified download in a thread, whose progress is read from the partial file `gallery.download` appends to).
The HTTP routes in `backend.api.handler` only call these and serialise the result; the page itself is static
(`backend/api/static/`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gallery.catalog import Catalog, Entry
from gallery.detect import HardwareProfile
from gallery.download import download_progress, safe_join
from gallery.select import Request, budget_for, candidates_for, select

from ..core.errors import ApexError
from ..proto import backend_pb2 as pb
from .demo import DEMOS

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}

# Keys of the backend's Status breakdown that are figures, not memory; every other key is bytes of one memory part.
FIGURES = ("slots", "slots_busy", "queue_depth", "slot_context", "requests_total", "prompt_tokens_total",
           "generated_tokens_total", "drafted_total", "accepted_total", "spec_drafted", "spec_accepted",
           "spec_verify_steps", "prompt_tokens_cached_total", "prompt_tokens_prefilled_total",
           "prompt_cache_misses_total", "prompt_cache_ram_entries",
           *(f"prompt_cache_hits_{source}_total" for source in ("slot", "checkpoint", "ram", "disk")))

# /metrics: (name, type, help, figure it reports).
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("apexmtp_requests_total", "counter", "Generation requests the backend finished.", "requests_total"),
    ("apexmtp_prompt_tokens_total", "counter", "Prompt tokens processed.", "prompt_tokens_total"),
    ("apexmtp_generated_tokens_total", "counter", "Tokens generated.", "generated_tokens_total"),
    ("apexmtp_draft_n_total", "counter", "Tokens drafted by the MTP head (timings.draft_n, summed).", "drafted_total"),
    ("apexmtp_draft_n_accepted_total", "counter", "Drafted tokens accepted (timings.draft_n_accepted, summed).",
     "accepted_total"),
    ("apexmtp_slots", "gauge", "Requests the loaded model can serve at once.", "slots"),
    ("apexmtp_slots_busy", "gauge", "Slots generating now.", "slots_busy"),
    ("apexmtp_queue_depth", "gauge", "Requests waiting for a free slot.", "queue_depth"),
    ("apexmtp_slot_context_tokens", "gauge", "Context of one slot (prompt + answer of one request).", "slot_context"),
    ("apexmtp_prompt_tokens_cached_total", "counter", "Prompt tokens reused instead of prefilled (timings.cache_n).",
     "prompt_tokens_cached_total"),
    ("apexmtp_prompt_tokens_prefilled_total", "counter", "Prompt tokens decoded.", "prompt_tokens_prefilled_total"),
    ("apexmtp_prompt_cache_misses_total", "counter", "Requests that reused no prompt token.",
     "prompt_cache_misses_total"),
    *((f"apexmtp_prompt_cache_hits_{source}_total", "counter", f"Requests whose prompt resumed from {what}.",
       f"prompt_cache_hits_{source}_total")
      for source, what in (("slot", "what their slot held"), ("checkpoint", "a recurrent-state checkpoint"),
                           ("ram", "the RAM prompt cache"), ("disk", "the disk prompt cache"))),
    ("apexmtp_prompt_cache_ram_entries", "gauge", "States held by the RAM prompt cache.", "prompt_cache_ram_entries"),
)


# ---------------------------------------------------------------------------------------------- status


def split_breakdown(breakdown: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The Status breakdown as (figures, memory parts in bytes)."""
    figures = {k: int(v) for k, v in breakdown.items() if k in FIGURES}
    memory = {k: int(v) for k, v in breakdown.items() if k not in FIGURES}
    return figures, memory


def backend_view(status: pb.StatusResponse, metrics: pb.MetricsResponse) -> dict[str, Any]:
    """The backend's Status and GetMetrics replies as the page and /metrics read them."""
    figures, memory = split_breakdown(status.memory.breakdown)
    return {
        "state": pb.StatusResponse.State.Name(status.state), "figures": figures, "memory": memory,
        "rss": status.memory.total,
        "last": {"tokens_per_second": metrics.tokens_per_second, "tokens": metrics.tokens_generated,
                 "prompt_tokens": metrics.prompt_tokens_processed, "draft_n": metrics.draft_n,
                 "draft_n_accepted": metrics.draft_n_accepted},
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(status: Mapping[str, Any]) -> str:
    """/metrics in Prometheus' text format (0.0.4) from `status` (the /api/status object)."""
    up = status["backend"] is not None
    lines = ["# HELP apexmtp_backend_up Whether the gRPC backend answers Status.", "# TYPE apexmtp_backend_up gauge",
             f"apexmtp_backend_up {int(up)}"]
    model = status.get("model")
    lines += ["# HELP apexmtp_model_loaded Whether a model is loaded and served.", "# TYPE apexmtp_model_loaded gauge",
              f"apexmtp_model_loaded {int(model is not None)}"]
    if model is not None:
        labels = f'model="{_label(model["name"])}",mtp="{str(model["mtp"]).lower()}",context="{model["context_size"]}"'
        lines += ["# HELP apexmtp_model_info The served model.", "# TYPE apexmtp_model_info gauge",
                  f"apexmtp_model_info{{{labels}}} 1"]
    if not up:
        return "\n".join(lines) + "\n"
    backend = status["backend"]
    figures = backend["figures"]
    for name, kind, help_, key in METRICS:
        if key in figures:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {figures[key]}"]
    lines += ["# HELP apexmtp_last_tokens_per_second Decode speed of the most recent request.",
              "# TYPE apexmtp_last_tokens_per_second gauge",
              f"apexmtp_last_tokens_per_second {backend['last']['tokens_per_second']:.6g}"]
    lines += ["# HELP apexmtp_memory_bytes Memory of the loaded model by part, as llama.cpp allocated it.",
              "# TYPE apexmtp_memory_bytes gauge"]
    lines += [f'apexmtp_memory_bytes{{part="{_label(part)}"}} {n}' for part, n in sorted(backend["memory"].items())]
    lines += ["# HELP apexmtp_backend_rss_bytes Resident memory of the backend process.",
              "# TYPE apexmtp_backend_rss_bytes gauge", f"apexmtp_backend_rss_bytes {backend['rss']}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- gallery


def _verdict(profile: HardwareProfile, catalog: Catalog, entry: Entry, request: Request) -> dict[str, Any]:
    """The selector's answer for this one tier on this machine (its row: fits, placement, context, why, ...)."""
    try:
        return select(profile, candidates_for(catalog, entry), catalog.policy, request).row()
    except ApexError as exc:
        return {"fits": False, "placement": None, "why": str(exc)}


def gallery_view(catalog: Catalog, profile: HardwareProfile, models_dir: Path,
                 request: Request | None = None) -> dict[str, Any]:
    """Families with their tier ladders (best quality first), each tier's verdict here (for the slots `request`
    asks for), the recommended tier."""
    request = request or Request()
    budget = budget_for(profile, catalog.policy)
    families = []
    for hub in catalog.hubs():
        try:
            pick = select(profile, candidates_for(catalog, hub), catalog.policy, request)
            recommended = pick.name if pick.fits else None
        except ApexError:
            recommended = None
        tiers = []
        for entry in catalog.family_tiers(hub):
            tiers.append({
                "name": entry.name, "tier": entry.tier, "size": entry.weights.total, "kl_mean": entry.kl_mean,
                "mtp": "mtp" in entry.tags, "downloaded": model_file(entry, models_dir).is_file(),
                "recommended": entry.name == recommended, "verdict": _verdict(profile, catalog, entry, request),
            })
        families.append({"name": hub.name, "description": hub.description, "repo": hub.repo, "license": hub.license,
                         "recommended": recommended, "tiers": tiers})
    return {
        "hardware": {"cpu": profile.cpu, "cpu_count": profile.cpu_count, "ram_total": profile.ram_total,
                     "gpus": [{"name": g.name, "total": g.total, "free": g.free} for g in profile.gpus],
                     "overrides": list(profile.overrides)},
        "budget": {"gpu": budget.gpu_label, "gpu_free": budget.gpu_free, "ram_free": budget.ram_free,
                   "unified": budget.unified},
        "demos": [{"name": d.name, "description": d.description, "mtp": "spec_type:draft-mtp" in d.options}
                  for d in DEMOS.values()],
        "families": families,
    }


def model_file(entry: Entry, models_dir: Path) -> Path:
    """Where `apexmtp pull` puts the entry's GGUF."""
    return safe_join(models_dir, entry.model_file.filename)


# ---------------------------------------------------------------------------------------------- pulls


@dataclass
class PullJob:
    """One gallery entry being pulled in a thread. Progress is the length of the partial file the verified
    download appends to, so it is what is on disk, whoever started the download."""

    name: str
    dest: Path
    total: int
    state: str = "downloading"  # downloading -> done | error
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def run(self, action: Callable[[], object]) -> None:
        """Run `action` (the pull) in a daemon thread, recording how it ended."""
        def work() -> None:
            try:
                action()
                self.state = "done"
            except ApexError as exc:
                self.state, self.error = "error", str(exc)
            except Exception as exc:  # a bug: say so in the page, keep the traceback in the log
                log.exception("pull of %s failed", self.name)
                self.state, self.error = "error", f"internal error ({type(exc).__name__}: {exc}); see the server log"
            finally:
                self.done.set()

        threading.Thread(target=work, name=f"pull-{self.name}", daemon=True).start()

    def snapshot(self) -> dict[str, Any]:
        """Progress now: state, bytes on disk, expected total, seconds so far, the error if it failed."""
        have = download_progress(self.dest).have
        return {"name": self.name, "state": self.state, "bytes": have, "total": max(self.total, have),
                "seconds": round(time.monotonic() - self.started, 2), "error": self.error}


class Pulls:
    """The pull jobs of this server, one per entry: a second request for an entry follows the running job."""

    def __init__(self) -> None:
        self._jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()

    def start(self, entry: Entry, models_dir: Path, action: Callable[[], object]) -> PullJob:
        with self._lock:
            job = self._jobs.get(entry.name)
            if job is None or job.done.is_set():
                job = PullJob(entry.name, model_file(entry, models_dir), entry.weights.total)
                self._jobs[entry.name] = job
                job.run(action)
            return job

    def snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [job.snapshot() for job in jobs]


def progress_events(job: PullJob, interval: float = 0.25) -> Iterable[dict[str, Any]]:
    """Snapshots of `job` every `interval` seconds until it ends (the last one says done or error)."""
    while not job.done.wait(interval):
        yield job.snapshot()
    yield job.snapshot()
