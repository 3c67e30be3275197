"""Memory budget strings: "2GiB", "512MB", "1.5G", "300000000" (bytes), or "25%" of expert bytes."""

from __future__ import annotations

import re

from ..errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*|%)\s*$")


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes in `text`; a percentage needs `total` (the model's expert bytes)."""
    m = _PATTERN.match(str(text))
    if not m:
        raise ConfigError(f"cannot read the memory size {text!r} (examples: 2GiB, 512MB, 25%)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if total is None:
            raise ConfigError("a percentage budget needs the model's expert size")
        return int(total * value / 100)
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit {m.group(2)!r} in {text!r} (B, KB, MB, GB, KiB, MiB, GiB)")
    return int(value * _UNITS[unit])
