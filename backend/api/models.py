"""What `apexmtp run` serves: its options, the model it prepares, and the model manager that loads and switches it.

`prepare` is LocalAI's path: `gallery.pull` resolves the reference and writes the model's LocalAI config, and the
LoadModel message is built from that config. `ModelManager` holds the backend subprocess and the model it serves,
answers whether a request can be served (503 while loading or after the backend died), switches to another model
on the same backend and runs the page's gallery downloads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from gallery.catalog import Catalog, load_catalog
from gallery.detect import HardwareProfile, add_workers, detect
from gallery.select import Request

from ..core import constants
from ..core.errors import ApexError, EntryNotFoundError, NoModelLoadedError
from ..proto import backend_pb2 as pb
from ..proto import backend_pb2_grpc as pb_grpc
from . import webui
from .httpd import DEFAULT_WORKERS
from .openai_api import ServedModel, invalid
from .supervisor import Backend, model_options

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4  # slots, as llama-server's automatic -np


@dataclass(frozen=True)
class RunOptions:
    """What `apexmtp run` (and `apexmtp chat` without --url) was asked for."""

    ref: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    tier: str | None = None
    context: int | None = None
    models_dir: Path | None = None
    threads: int = 0
    embeddings: bool = False
    reranking: bool = False
    no_mtp: bool = False
    parallel: int = DEFAULT_PARALLEL
    prefer: str = "quality"
    progress: bool = True
    echo_backend: bool = True
    gallery: Path | None = None  # gallery data directory (default: the packaged gallery)
    api_keys: tuple[str, ...] = ()
    http_workers: int = DEFAULT_WORKERS
    rpc: tuple[str, ...] = ()  # RPC workers (`apexmtp worker`) to split the model across
    mmproj: Path | None = None  # vision projector GGUF; overrides the one the model config names
    backend_options: tuple[str, ...] = ()  # from --cache-ram, --prompt-cache, ..., --option (backend_options())

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir or constants.MODELS_DIR).expanduser()



def prepare(opts: RunOptions, *, profile: HardwareProfile | None = None,
            catalog: Catalog | None = None) -> tuple[pb.ModelOptions, ServedModel]:
    """Pull the model (or the embedded demo) and build LoadModel's message from the config pull wrote."""
    import yaml

    from gallery.pull import pull

    from .demo import DEFAULT_DEMO, DEMOS, demo_path, is_demo, merge_options

    models_dir = opts.models_path
    mtp = False if opts.no_mtp else None
    if is_demo(opts.ref):
        demo = DEMOS[opts.ref or DEFAULT_DEMO]
        pulled = pull(str(demo_path(demo.name)), context=opts.context, models_dir=models_dir, progress=False, mtp=mtp,
                      profile=profile, catalog=catalog, parallel=opts.parallel)
        options = merge_options(pulled.options, ("spec_type:none",) if opts.no_mtp else demo.options)
        aliases = {demo.name} | ({"demo"} if demo.name == DEFAULT_DEMO else set())
    else:
        assert opts.ref is not None  # no reference at all is the demo
        pulled = pull(opts.ref, tier=opts.tier, context=opts.context, models_dir=models_dir,
                      progress=opts.progress, mtp=mtp, profile=profile, catalog=catalog, parallel=opts.parallel,
                      prefer=opts.prefer)
        options, aliases = list(pulled.options), {opts.ref}
    options = merge_options(options, (f"parallel:{opts.parallel}",) + ((f"rpc_servers:{','.join(opts.rpc)}",)
                                                                     if opts.rpc else ()) + opts.backend_options)
    log.info("%s", pulled.explanation)
    config = yaml.safe_load(pulled.config_path.read_text(encoding="utf-8"))
    config["options"] = options
    if opts.mmproj is not None:
        config["mmproj"] = str(opts.mmproj.expanduser().resolve())
    load = model_options(config, models_dir, threads=opts.threads, embeddings=opts.embeddings,
                         reranking=opts.reranking)
    defaults = {k: v for k, v in (config.get("parameters") or {}).items() if k != "model"}
    aliases |= {pulled.model_path.name, pulled.model_path.stem}
    served = ServedModel(name=pulled.name, aliases=frozenset(aliases - {pulled.name}), context_size=load.ContextSize,
                         identity=load.Model, embeddings=load.Embeddings, reranking=load.Reranking,
                         mtp="spec_type:draft-mtp" in options, defaults=defaults)
    return load, served



class ModelManager:
    """The backend and the model it serves; until `start` (or `attach`) gives it one, requests get 503."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.backend: Backend | None = None
        self.model: ServedModel | None = None
        self.loading = ""  # the model being loaded, while one is
        self.load_error = ""  # why no model is served after a failed switch
        self.pulls = webui.Pulls()
        self._switch_lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._profile: HardwareProfile | None = None

    @property
    def stub(self) -> pb_grpc.BackendStub:
        assert self.backend is not None
        return self.backend.stub

    @property
    def catalog(self) -> Catalog:
        """The gallery (`--gallery DIR`, else the packaged one), loaded on first use."""
        if self._catalog is None:
            self._catalog = load_catalog(self.options.gallery)
        return self._catalog

    @property
    def profile(self) -> HardwareProfile:
        """This machine as the selector sees it, detected once (before a model takes its memory), with the RPC
        workers of `--rpc` and the memory they report (`WorkerUnreachableError` naming one that does not answer)."""
        if self._profile is None:
            self._profile = add_workers(detect(), self.options.rpc)
        return self._profile

    def start(self) -> None:
        """Prepare the model of the options, start the backend and load it; the caller stops the backend (`close`)
        when this raises."""
        opts = self.options
        self.loading = opts.ref or "demo"
        try:
            load, served = prepare(opts, profile=self.profile, catalog=self.catalog)
            backend = Backend(echo=opts.echo_backend)
            self.backend = backend  # stopped by close() even if loading fails
            backend.wait_healthy()
            message = backend.load(load)
            log.info("backend %s: %s", backend.addr, message)
            self.attach(backend, served)
        finally:
            self.loading = ""

    def attach(self, backend: Backend, model: ServedModel) -> None:
        """Serve `model`, loaded on `backend`."""
        self.backend, self.model = backend, model

    def ready(self, name: str | None = None) -> ServedModel:
        """The served model if it is up and `name` refers to it; raises for 503 (loading, dead) and 404."""
        model = self.model
        if self.backend is None or model is None:
            if self.load_error and not self.loading:
                raise NoModelLoadedError(self.load_error)
            raise NoModelLoadedError(f"loading model {self.loading}".rstrip())
        self.backend.check()
        if name is not None and not isinstance(name, str):
            raise invalid("model", "model must be a string")
        if not model.matches(name):
            raise EntryNotFoundError(f"model {name!r} is not served here; this server serves {model.name!r}")
        return model

    def health(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and body of /health."""
        try:
            model = self.ready()
        except ApexError as exc:
            return 503, {"status": "unavailable", "error": {"code": 503, "message": str(exc),
                                                            "type": "unavailable_error"}}
        assert self.backend is not None
        return 200, {"status": "ok", "model": model.name,
                     "backend": {"addr": self.backend.addr, "pid": self.backend.proc.pid}}

    def status_view(self) -> dict[str, Any]:
        """What the page's status panel and /metrics show: state, served model, the backend's figures, pulls."""
        try:
            model: ServedModel | None = self.ready()
            state, message = "ready", ""
        except ApexError as exc:
            model, message = None, str(exc)
            state = "loading" if self.loading else "down"
        backend = None
        if self.backend is not None and self.backend.exit_reason is None:
            try:
                backend = dict(self.backend.status(), addr=self.backend.addr, pid=self.backend.proc.pid)
            except grpc.RpcError as exc:
                message = message or f"the backend does not answer Status: {exc.details()}"
        return {
            "state": state, "message": message, "auth": bool(self.options.api_keys), "backend": backend,
            "model": None if model is None else {
                "name": model.name, "aliases": sorted(model.aliases), "context_size": model.context_size,
                "mtp": model.mtp, "embeddings": model.embeddings},
            "pulls": self.pulls.snapshots(),
        }

    def gallery_view(self) -> dict[str, Any]:
        """The page's gallery panel: what fits this machine, and which entry is served."""
        view = webui.gallery_view(self.catalog, self.profile, self.options.models_path,
                                  Request(parallel=self.options.parallel))
        model = self.model
        view["serving"] = None if model is None else [model.name, *sorted(model.aliases)]
        return view

    def pull(self, name: str) -> webui.PullJob:
        """Start (or follow) the verified download of gallery tier `name`, as `apexmtp pull NAME` does."""
        from gallery.pull import pull

        entry = self.catalog.get(name)
        if entry.is_hub:
            raise invalid("name", f"{name} is a family: pull one of its tiers ({', '.join(entry.variants)})")
        opts = self.options
        return self.pulls.start(entry, opts.models_path, lambda: pull(
            entry.name, models_dir=opts.models_path, context=opts.context, profile=self.profile, progress=False,
            catalog=self.catalog, mtp=False if opts.no_mtp else None, parallel=opts.parallel))

    def switch(self, ref: str) -> ServedModel:
        """Serve `ref` instead: LoadModel on the same backend with the options `prepare` builds for it.

        Requests in flight on the old model end with 503 (the backend unloads it). If the backend refuses the new
        model before unloading, the old one stays served; otherwise the failure is what /health reports.
        """
        with self._switch_lock:
            backend = self.backend
            if backend is None:
                raise NoModelLoadedError(f"loading model {self.loading}".rstrip())
            backend.check()
            load, served = prepare(replace(self.options, ref=ref, tier=None), profile=self.profile,
                                   catalog=self.catalog)
            old = self.model
            self.model, self.loading, self.load_error = None, served.name, ""
            try:
                message = backend.load(load)
            except ApexError as exc:
                if backend.has_model():
                    self.model = old
                else:
                    self.load_error = f"no model is served: loading {served.name} failed: {exc}"
                raise
            finally:
                self.loading = ""
            log.info("now serving %s: %s", served.name, message)
            self.model = served
            return served

    def close(self) -> None:
        """Stop the backend (in-flight calls end with its channel)."""
        if self.backend is not None:
            self.backend.stop()
