"""Session fixtures that write tiny synthetic qwen35moe GGUFs (backend.synth.qwen35moe) once per test run.

Import these names into a conftest.py (or a test module) to use them:
`from synth_models import synth_model, tiny_random_gguf, tiny_predictable_gguf, tiny_nomtp_gguf,
tiny_mmproj_gguf`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from backend.synth.qwen35moe import PRESETS, SynthConfig, write_model


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`synth_model(mode="random", acceptance=1.0, mtp=True, dtype="f32", seed=0, config=None) -> Path`.

    Files are cached per argument set for the whole session, so asking twice costs nothing.
    """
    root = tmp_path_factory.mktemp("synth")
    cache: dict[tuple, Path] = {}

    def make(
        mode: str = "random",
        acceptance: float = 1.0,
        mtp: bool = True,
        dtype: str = "f32",
        seed: int = 0,
        config: SynthConfig | None = None,
    ) -> Path:
        cfg = replace(config or PRESETS["tiny"], mtp=mtp)
        key = (mode, acceptance, dtype, seed, cfg)
        if key not in cache:
            name = f"{mode}-a{acceptance:g}-{'mtp' if mtp else 'nomtp'}-{dtype}-s{seed}-{len(cache)}.gguf"
            cache[key] = write_model(root / name, cfg, mode=mode, acceptance=acceptance, dtype=dtype, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_random_gguf(synth_model: Callable[..., Path]) -> Path:
    """Tiny random-weight model with an MTP block."""
    return synth_model("random")


@pytest.fixture(scope="session")
def tiny_predictable_gguf(synth_model: Callable[..., Path]) -> Path:
    """Tiny permutation model whose MTP head always agrees with the trunk (100% acceptance)."""
    return synth_model("predictable", acceptance=1.0)


@pytest.fixture(scope="session")
def tiny_nomtp_gguf(synth_model: Callable[..., Path]) -> Path:
    """Tiny random-weight model without an MTP block."""
    return synth_model("random", mtp=False)


@pytest.fixture(scope="session")
def tiny_mmproj_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random vision projector (qwen3vl_merger) for the tiny preset's n_embd."""
    from backend.synth.mmproj import write_projector

    return write_projector(tmp_path_factory.mktemp("mmproj") / "mmproj-tiny.gguf", PRESETS["tiny"].n_embd)
