"""Write a tiny random vision projector (mmproj) GGUF that llama.cpp's mtmd loads for a synthetic qwen35moe.

The projector is `qwen3vl_merger`, the type Qwen3.5/3.6's own mmproj files use (serving-at-scale.md §3), without
the optional deepstack layers, so its output width is exactly the text model's `n_embd` (mtmd refuses a
mismatch). One ViT block of width 32 over 16-pixel patches and a 2x2 merge keeps an image to a few tokens and
its encode to milliseconds; `image_max_pixels` caps what a large input is resized to. Tensor names and keys are
the ones `clip.cpp` reads for this projector type (`clip-impl.h`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.errors import InvalidRequestError
from .gguf_writer import MetaValue, write_gguf

PROJECTOR_TYPE = "qwen3vl_merger"
PATCH = 16  # pixels per patch side
MERGE = 2  # spatial merge: one image token per MERGE x MERGE patches
_STD = 0.02


def projector_layout(n_embd_text: int, *, width: int = 32, n_ff: int = 64, n_layer: int = 1,
                     image_size: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor as `(name, ne)` in ggml order (ne[0] = row length)."""
    side = image_size // PATCH
    merged = width * MERGE * MERGE
    out: list[tuple[str, tuple[int, ...]]] = [
        ("v.patch_embd.weight", (PATCH, PATCH, 3, width)),
        ("v.patch_embd.weight.1", (PATCH, PATCH, 3, width)),
        ("v.patch_embd.bias", (width,)),
        ("v.position_embd.weight", (width, side * side)),
    ]
    for il in range(n_layer):
        p = f"v.blk.{il}"
        out += [
            (f"{p}.ln1.weight", (width,)), (f"{p}.ln1.bias", (width,)),
            (f"{p}.attn_qkv.weight", (width, 3 * width)), (f"{p}.attn_qkv.bias", (3 * width,)),
            (f"{p}.attn_out.weight", (width, width)), (f"{p}.attn_out.bias", (width,)),
            (f"{p}.ln2.weight", (width,)), (f"{p}.ln2.bias", (width,)),
            (f"{p}.ffn_up.weight", (width, n_ff)), (f"{p}.ffn_up.bias", (n_ff,)),
            (f"{p}.ffn_down.weight", (n_ff, width)), (f"{p}.ffn_down.bias", (width,)),
        ]
    out += [
        ("v.post_ln.weight", (width,)), ("v.post_ln.bias", (width,)),
        ("mm.0.weight", (merged, merged)), ("mm.0.bias", (merged,)),
        ("mm.2.weight", (merged, n_embd_text)), ("mm.2.bias", (n_embd_text,)),
    ]
    return out


def projector_metadata(n_embd_text: int, *, width: int = 32, n_ff: int = 64, n_layer: int = 1,
                       image_size: int = 64, max_pixels: int = 256 * 256) -> dict[str, MetaValue]:
    """The GGUF keys clip.cpp's loader reads for a qwen3vl_merger vision projector."""
    from gguf import GGUFValueType as T

    return {
        "general.architecture": (T.STRING, "clip"),
        "general.name": (T.STRING, "apexmtp-synthetic-mmproj"),
        "general.file_type": (T.UINT32, 0),
        "clip.projector_type": (T.STRING, PROJECTOR_TYPE),
        "clip.has_vision_encoder": (T.BOOL, True),
        "clip.use_gelu": (T.BOOL, True),
        "clip.vision.embedding_length": (T.UINT32, width),
        "clip.vision.feed_forward_length": (T.UINT32, n_ff),
        "clip.vision.block_count": (T.UINT32, n_layer),
        "clip.vision.projection_dim": (T.UINT32, n_embd_text),
        "clip.vision.attention.head_count": (T.UINT32, 2),
        "clip.vision.attention.layer_norm_epsilon": (T.FLOAT32, 1e-6),
        "clip.vision.image_size": (T.UINT32, image_size),
        "clip.vision.patch_size": (T.UINT32, PATCH),
        "clip.vision.spatial_merge_size": (T.UINT32, MERGE),
        "clip.vision.image_max_pixels": (T.UINT32, max_pixels),
        "clip.vision.image_mean": (T.ARRAY, [0.5, 0.5, 0.5], T.FLOAT32),
        "clip.vision.image_std": (T.ARRAY, [0.5, 0.5, 0.5], T.FLOAT32),
    }


def write_projector(path: str | os.PathLike[str], n_embd_text: int, *, seed: int = 0) -> Path:
    """Write a random qwen3vl_merger projector whose image embeddings are `n_embd_text` wide.

    Raises:
        InvalidRequestError: a text width the merger cannot produce.
    """
    if n_embd_text <= 0 or n_embd_text % 32:
        raise InvalidRequestError(f"the text model's n_embd must be a positive multiple of 32, got {n_embd_text}")
    rng = np.random.default_rng(seed)
    layout = [(name, ne, "F32") for name, ne in projector_layout(n_embd_text)]

    def data() -> Iterator[np.ndarray]:
        for name, ne, _ in layout:
            shape = tuple(reversed(ne))
            if name.endswith(("ln1.weight", "ln2.weight", "post_ln.weight")):
                yield np.ones(shape, np.float32)
            else:
                yield (rng.standard_normal(shape, dtype=np.float32) * _STD).astype(np.float32)

    return write_gguf(Path(path), projector_metadata(n_embd_text), layout, data)
