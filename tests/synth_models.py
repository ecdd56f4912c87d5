"""Session fixtures that write tiny synthetic qwen35moe GGUFs (backend.synth.qwen35moe) once per test run.

Import these names into a conftest.py (or a test module) to use them:
`from synth_models import synth_model, tiny_random_gguf, tiny_predictable_gguf, tiny_nomtp_gguf,
tiny_mmproj_gguf`; `write_qwen3` writes a tiny dense qwen3 (a reranker, or a draft model) where a test needs one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from backend.synth.qwen35moe import PRESETS, SynthConfig, build_vocab, write_model


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


def write_qwen3(path: Path, *, rank_head: bool = False, n_embd: int = 64, n_head: int = 4, n_ff: int = 128,
                seed: int = 0) -> Path:
    """A tiny random dense qwen3 model of one layer with the synthetic byte-level vocabulary (the tiny qwen35moe
    preset's, so it can draft for it). `rank_head`: a reranker, with the `cls.output` head and yes/no labels of
    Qwen3-Reranker GGUFs and rank pooling (llama.cpp scores with a softmax over the labels); else a language
    model whose output is tied to its token embeddings."""
    import gguf

    rng = np.random.default_rng(seed)
    vocab, head_dim = build_vocab(512), n_embd // n_head
    w = gguf.GGUFWriter(str(path), "qwen3")
    for key, value in (("context_length", 512), ("embedding_length", n_embd), ("block_count", 1),
                       ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                       ("attention.head_count_kv", n_head), *((("pooling_type", 4),) if rank_head else ())):
        w.add_uint32(f"qwen3.{key}", value)
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("qwen3.rope.freq_base", 10000.0)
    if rank_head:
        w.add_array("qwen3.classifier.output_labels", ["yes", "no"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(list(vocab.tokens))
    w.add_token_types(list(vocab.token_types))
    w.add_token_merges(list(vocab.merges))
    w.add_eos_token_id(len(vocab.tokens) - 1)
    w.add_add_bos_token(False)
    shapes = {"token_embd.weight": (512, n_embd), "output_norm.weight": (n_embd,),
              **({"cls.output.weight": (2, n_embd)} if rank_head else {}),
              "blk.0.attn_norm.weight": (n_embd,), "blk.0.ffn_norm.weight": (n_embd,),
              "blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,),
              **{f"blk.0.attn_{x}.weight": (n_embd, n_embd) for x in ("q", "k", "v", "output")},
              "blk.0.ffn_gate.weight": (n_ff, n_embd), "blk.0.ffn_up.weight": (n_ff, n_embd),
              "blk.0.ffn_down.weight": (n_embd, n_ff)}
    for name, shape in shapes.items():
        data = np.ones(shape) if "norm" in name else rng.normal(0, 0.3, shape)
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
