"""Helpers shared by the bench scripts: machine description, robust timing, and server subprocesses over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backend.core.process import stop_process
from backend.engine.speculative import SpecConfig

ROOT = Path(__file__).resolve().parents[1]
# llama-server's option for each SpecConfig field, by --spec-type (common/arg.cpp)
LLAMA_SERVER_SPEC_OPTIONS = {
    "ngram-simple": {"ngram_size_n": "--spec-ngram-simple-size-n", "ngram_size_m": "--spec-ngram-simple-size-m"},
    "ngram-mod": {"ngram_mod_n_match": "--spec-ngram-mod-n-match", "ngram_mod_n_min": "--spec-ngram-mod-n-min",
                  "ngram_mod_n_max": "--spec-ngram-mod-n-max"},
    "draft-mtp": {"n_max": "--spec-draft-n-max", "n_min": "--spec-draft-n-min", "p_min": "--spec-draft-p-min"},
}
LLAMA_SERVER_SPEC_OPTIONS["draft-simple"] = LLAMA_SERVER_SPEC_OPTIONS["draft-mtp"]  # the draft knobs are shared


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = "RAM unknown"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {ram}, {platform.system()} {platform.release()}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def sse_completion(port: int, body: dict[str, Any], timeout: float = 900) -> Iterator[dict[str, Any]]:
    """POST a streamed /v1/completions to 127.0.0.1:`port` and yield each server-sent JSON chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        for line in resp:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])
    finally:
        conn.close()


def post_json(port: int, path: str, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """POST `body` to 127.0.0.1:`port``path` and return the JSON answer (non-streamed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return json.loads(data)
    finally:
        conn.close()


def llama_completion(port: int, prompt: str | list[int], tokens: int, **extra: Any) -> tuple[float, float, dict]:
    """One greedy llama-server /completion of `tokens` tokens that prefills from scratch: its decode tok/s (the
    server's own timing), its draft acceptance, and the whole answer."""
    r = post_json(port, "/completion", {"prompt": prompt, "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                                        "cache_prompt": False, "stream": False, **extra})
    t = r["timings"]
    return t["predicted_per_second"], t.get("draft_n_accepted", 0) / t["draft_n"] if t.get("draft_n") else 0.0, r


def llama_server_cmd(binary: Path, model: Path, port: int, threads: int, context: int, batch: int,
                     parallel: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """llama-server on 127.0.0.1:`port` serving `model`; `extra` adds options (speculation, caches)."""
    return [str(binary), "-m", str(model), "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(context), "-b", str(batch), "--no-webui", *extra]


def llama_server_spec(spec: SpecConfig, drafter: str, draft: Path | None = None) -> list[str]:
    """llama-server's options for `spec` with `drafter` ("draft-mtp", "draft-simple" with the `draft` GGUF, or ""):
    the same types and knobs. llama-server drafts by n-gram first, then with the model, as apexmtp does; it has no
    adaptive draft length (its n_max is fixed)."""
    types = [t for t in (spec.ngram, drafter if spec.n_max else "") if t]
    opts = [o for t in types for field, name in LLAMA_SERVER_SPEC_OPTIONS[t].items()
            for o in (name, str(getattr(spec, field)))]
    model = ["--spec-draft-model", str(draft)] if "draft-simple" in types and draft else []
    return ["--spec-type", ",".join(types), *opts, *model] if types else []


class Server:
    """A server subprocess on 127.0.0.1:`port`, ready once /health answers 200; its output is kept for errors."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited:\n{self.output()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{name} did not become healthy")

    def output(self) -> str:
        """What the server has written to stdout and stderr so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()
