"""Classify GGUF tensors by role (routed/shared experts, attention/SSM, globals, MTP head) from their names.

The rules are data (`classification` and `llama_quant` in recipes.yaml). Trunk vs MTP layer comes from
`<arch>.block_count` and `<arch>.nextn_predict_layers`: blocks at index >= block_count - nextn are MTP layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .recipes import classification, llama_quant_facts

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorRole:
    """Where a tensor sits: its role, layer index (None for globals) and whether the layer is an MTP layer."""

    role: str
    layer: int | None = None
    mtp: bool = False


def n_dims(ne: tuple[int, ...]) -> int:
    """`ggml_n_dims`: trailing dimensions of size 1 do not count (a `[2048, 1]` tensor is 1-D)."""
    dims = len(ne)
    while dims > 1 and ne[dims - 1] == 1:
        dims -= 1
    return max(dims, 1)


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """Mirror of llama.cpp's `tensor_allows_quantization`: 2-D/3-D `*weight` tensors minus norms, routers, conv1d...

    Tensors for which this is False keep their source type whatever the plan says.
    """
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    never = llama_quant_facts()["never_quantized"]
    return name not in never["exact"] and not any(s in name for s in never["contains"])


@lru_cache(maxsize=1)
def _layer_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple((role, re.compile(rx)) for role, rx in classification()["layer_roles"].items())


def classify(name: str, trunk_layers: int) -> TensorRole | None:
    """Role of a quantizable tensor, or None when no rule knows the name (the plan reports those).

    Args:
        name: GGUF tensor name, e.g. `blk.12.ffn_up_exps.weight`.
        trunk_layers: number of trunk blocks; `blk.i` with i >= trunk_layers is an MTP layer.
    """
    cls = classification()
    if name in cls["globals"]:
        return TensorRole(cls["globals"][name])
    m = _BLOCK.match(name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    mtp = layer >= trunk_layers
    for role, rx in _layer_patterns():
        if rx.match(rest):
            if role in cls["mtp_only"] and not mtp:
                return None
            return TensorRole(role, layer, mtp)
    return None
