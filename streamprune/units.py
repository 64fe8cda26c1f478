"""Byte counts in and out: '24GB' -> bytes, bytes -> '1.5 GiB'. No torch here: the CLI imports it first."""

from __future__ import annotations

import re

from .errors import StreamPruneError

GiB = 1024 ** 3
UNITS = {"B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "MIB": 1024 ** 2,
         "G": GiB, "GB": GiB, "GIB": GiB, "T": 1024 ** 4, "TB": 1024 ** 4, "TIB": 1024 ** 4}


def parse_size(text: str | int | None, flag: str | None = None) -> int | None:
    """'24GB' -> bytes. Memory sizes are binary (a '24 GB' card has 24 GiB), so GB and GiB both mean 2**30; a bare
    number is GB too (nobody means a 24-byte card). An int is bytes already (the Python API). `flag` names the
    option in the error."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    what = f"{flag} {text!r}" if flag else repr(text)
    if not m or (m.group(2) and m.group(2).upper() not in UNITS):
        raise StreamPruneError(f"{what}: not a memory size (e.g. 24GB, 512MiB; a bare number is GB)")
    size = int(float(m.group(1)) * (UNITS[m.group(2).upper()] if m.group(2) else GiB))
    if size <= 0:
        raise StreamPruneError(f"{what}: a memory size must be more than 0")
    return size


def human_count(n: int) -> str:
    """7241732096 -> '7.24B', 4718592 -> '4.7M': parameter counts in the units model cards use."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def human_seconds(s: float) -> str:
    """0.42 -> '0.4 s', 95 -> '1.6 min', 7300 -> '2.0 h'."""
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
