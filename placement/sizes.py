"""Memory sizes as people write them: `8GiB`, `7.5GB`, `512MiB`, `24G`, `1073741824`.

Units: `KiB MiB GiB TiB` (and the bare letters `K M G T`, as `docker -m` and `free` read them) are
binary, 1024-based; `KB MB GB TB` are decimal, 1000-based; a bare number or `B` means bytes. Case
does not matter. Pure Python.
"""
from __future__ import annotations

import re

_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A memory size that cannot be parsed; the message shows what would work."""


def parse_size(text: str | int | float, *, what: str = "size") -> int:
    """Bytes in `text` ('8GiB', '7.5GB', '512MiB', '24G', '1e9' is NOT accepted). Ints pass through.

    `what` names the value in the error message (e.g. '--gpu-memory').
    """
    if isinstance(text, bool):
        raise SizeError(f"{what}: expected a size like 8GiB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"{what}: size must not be negative, got {text}")
        return text
    if isinstance(text, float):
        if not text >= 0 or text == float("inf"):
            raise SizeError(f"{what}: size must be a finite non-negative number, got {text}")
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match:
        raise SizeError(f"{what}: cannot read {text!r} as a size; write e.g. 8GiB, 7.5GB, 512MiB "
                        f"or a number of bytes")
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    if not prefix:
        if binary:
            raise SizeError(f"{what}: cannot read {text!r} as a size; write e.g. 8GiB, 7.5GB, 512MiB")
        scale = 1
    elif binary or not byte:
        scale = _BINARY[prefix]
    else:
        scale = _DECIMAL[prefix]
    return int(round(float(number) * scale))


def format_size(num_bytes: int | float) -> str:
    """Binary units with two decimals ('8.00 GiB', '416.03 MiB', '512 B')."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")
