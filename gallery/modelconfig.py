"""LocalAI model configuration files (`<models>/<name>.yaml`) for models pulled through the gallery.

The file is what LocalAI's model loader reads (core/config/model_config.go, localai-protocol.md §3.5): our backend
name `apexmtp`, the GGUF path relative to the models dir, the runtime options the selector chose (context, GPU layers,
KV cache types, flash attention) and `options` spelled out, because LocalAI's llama-cpp config hooks (which would add
`use_jinja` or the MTP defaults) only run for `backend: llama-cpp`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from backend.core.errors import UnsafePathError

from .schema import MTP_OPTION

BACKEND_NAME = "apexmtp"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_OVERRIDES: dict[str, Any] = {
    "known_usecases": ["chat"],
    "template": {"use_tokenizer_template": True},
}


def tags_for(options: list[str] | tuple[str, ...], tags: list[str] | tuple[str, ...]) -> list[str]:
    """`tags` with `mtp` present if and only if `options` enable draft-mtp (LocalAI's tagging rule)."""
    out = [t for t in tags if t != "mtp"]
    return out + ["mtp"] if MTP_OPTION in options else out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, `over` wins (LocalAI merges gallery overrides onto the base config the same way)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_config(
    name: str,
    model: str,
    *,
    options: list[str],
    context_size: int,
    gpu_layers: int,
    cache_type_k: str,
    cache_type_v: str,
    flash_attention: str,
    overrides: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """The model config mapping: the entry's overrides (sampling, template, usecases) under the selector's
    runtime values, which always win."""
    runtime = {
        "name": name,
        "backend": BACKEND_NAME,
        "context_size": context_size,
        "gpu_layers": gpu_layers,
        "mmap": True,
        "flash_attention": flash_attention,
        "cache_type_k": cache_type_k,
        "cache_type_v": cache_type_v,
        "options": list(options),
        "parameters": {"model": model},
    }
    if description:
        runtime["description"] = description
    config = _merge(DEFAULT_OVERRIDES, overrides or {})
    return _merge(config, runtime)


def write_config(models_dir: Path, config: dict[str, Any], *, comment: str = "") -> Path:
    """Write `<models_dir>/<name>.yaml` atomically (temp file + rename); `comment` becomes a leading YAML comment.

    Raises:
        UnsafePathError: the name is not a plain file name.
    """
    name = str(config["name"])
    if not _NAME_RE.match(name):
        raise UnsafePathError(f"{name}.yaml", models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / f"{name}.yaml"
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False, width=119, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path
