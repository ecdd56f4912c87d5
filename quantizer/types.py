"""ggml type facts the planner needs: names, block sizes, bytes per row, ftype ids, llama.cpp's shape fallback.

Sizes come from the `gguf` package (`GGML_QUANT_SIZES`), which mirrors ggml's own block structs, so the plan's
size prediction uses the same numbers llama.cpp writes.
"""

from __future__ import annotations

from backend.core.errors import RecipeError


def _quant_sizes() -> dict[str, tuple[int, int]]:
    from gguf import GGML_QUANT_SIZES

    return {t.name: size for t, size in GGML_QUANT_SIZES.items()}


_SIZES = _quant_sizes()


def check_type(name: object) -> str:
    """Canonical upper-case ggml type name (`q6_k` -> `Q6_K`).

    Raises:
        RecipeError: not a ggml type.
    """
    canon = str(name).strip().upper()
    if canon not in _SIZES:
        raise RecipeError(f"unknown ggml type {name!r}")
    return canon


def block_size(type_name: str) -> int:
    """Elements per block (1 for F32/F16/BF16, 32 for Q8_0, 256 for K-quants and most IQ types)."""
    return _SIZES[check_type(type_name)][0]


def row_bytes(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements stored as `type_name` (`ggml_row_size`)."""
    blck, size = _SIZES[check_type(type_name)]
    return n_per_row // blck * size


def tensor_bytes(type_name: str, ne: tuple[int, ...]) -> int:
    """Bytes of a whole tensor with ggml dims `ne` stored as `type_name`."""
    rows = 1
    for d in ne[1:]:
        rows *= d
    return rows * row_bytes(type_name, ne[0])


def is_quantized(type_name: str) -> bool:
    """True for block-quantized types (everything but the float and integer types)."""
    return check_type(type_name) not in {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


def ggml_name(type_name: str) -> str:
    """The spelling `ggml_type_name` uses (`q6_K`, `iq2_xxs`, `f16`); llama-quantize matches it case-insensitively."""
    low = check_type(type_name).lower()
    return low[:-2] + "_K" if low.endswith("_k") else low


def ggml_type_id(type_name: str) -> int:
    """The `enum ggml_type` value."""
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[check_type(type_name)].value)


def ftype_id(ftype: str) -> int:
    """The `enum llama_ftype` value of a base ftype name such as `Q5_K_M` or `IQ2_XXS`.

    Raises:
        RecipeError: llama.cpp has no such ftype.
    """
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.strip().upper()}", None)
    if value is None:
        raise RecipeError(f"unknown llama ftype {ftype!r}")
    return int(value)


def fallback_type(target: str, n_per_row: int, fallbacks: dict[str, str]) -> str:
    """Type llama.cpp actually writes for a row length: `tensor_type_fallback` in src/llama-quant.cpp.

    A row that is not a whole number of blocks demotes the type through `fallbacks`; if that still does not
    fit (or there is no smaller block), F16.
    """
    target = check_type(target)
    if n_per_row % block_size(target) == 0:
        return target
    demoted = check_type(fallbacks.get(target, target))
    return demoted if n_per_row % block_size(demoted) == 0 else "F16"
