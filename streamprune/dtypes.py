"""Which dtypes hold which values exactly. Imports nothing else from the package."""

from __future__ import annotations

import torch


def exact_cast(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Does a value of dtype `stored` survive the trip to `compute` and back bit for bit?"""
    if stored == compute or not stored.is_floating_point:
        return True
    wide = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}
    return wide.get(compute, 0) > wide.get(stored, 9)
