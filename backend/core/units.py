"""Memory sizes as people write them ("24GiB", "16 GB", "512M") and as `apexmtp` prints them.

Decimal suffixes (kB, MB, GB, TB) mean powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of 1024, and a bare
letter (K, M, G, T) means binary too, because that is what `free -g`, `nvidia-smi` and llama.cpp report.
"""

from __future__ import annotations

import re

from .errors import InvalidRequestError

GiB = 1024**3
MiB = 1024**2
GB = 1e9  # bandwidths are quoted in GB/s (decimal), as datasheets do

_FACTORS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": MiB,
    "g": GiB,
    "t": 1024**4,
    "kib": 1024,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | float) -> int:
    """Parse a memory size into bytes: `24GiB`, `24G`, `16 GB`, `1.5TiB`, `0`, or a plain byte count.

    Raises:
        InvalidRequestError: the text is not a size (the message shows accepted forms).
    """
    if isinstance(text, (int, float)):
        if text < 0:
            raise InvalidRequestError(f"memory size must not be negative: {text}")
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _FACTORS:
        raise InvalidRequestError(f"not a memory size: {text!r} (use e.g. 24GiB, 24G, 16GB or 512MiB)")
    return int(float(m.group(1)) * _FACTORS[unit])


def gib(n_bytes: float) -> str:
    """`n_bytes` as GiB with one decimal, e.g. `15.8 GiB` (the precision the explanations need)."""
    return f"{n_bytes / GiB:.1f} GiB"


def human(n_bytes: float) -> str:
    """`n_bytes` with a binary unit that keeps 1-3 integer digits (`820 MiB`, `15.8 GiB`)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def ctx_label(n_ctx: int) -> str:
    """Context length as people say it: 32768 -> `32k`, 262144 -> `256k`, 4000 -> `4000`."""
    return f"{n_ctx // 1024}k" if n_ctx % 1024 == 0 else str(n_ctx)
