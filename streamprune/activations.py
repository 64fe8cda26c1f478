"""The activation cache: one block's inputs and outputs for every calibration sequence.

Three tiers with one interface: a tensor on the GPU, a tensor in host RAM (pinned when CUDA computes), or a
file on disk read and written with positioned I/O (no mapping, so nothing of it counts in RSS).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

class TensorStore:
    """Sequences [N, L, H] held in one tensor on `device`."""

    def __init__(self, n: int, seqlen: int, hidden: int, dtype, device, pin: bool = False):
        self.shape, self.dtype = (seqlen, hidden), dtype
        self.data = torch.empty((n, seqlen, hidden), dtype=dtype, device=device, pin_memory=pin)

    def read(self, i: int, j: int, device) -> torch.Tensor:
        return self.data[i:j].to(device, non_blocking=True)

    def write(self, i: int, value: torch.Tensor) -> None:
        self.data[i:i + value.shape[0]].copy_(value, non_blocking=False)

    def close(self) -> None:
        self.data = None


class FileStore:
    """Sequences [N, L, H] in a flat file; sequence i at byte i * L * H * itemsize."""

    def __init__(self, path: Path, n: int, seqlen: int, hidden: int, dtype):
        self.path, self.shape, self.dtype = Path(path), (seqlen, hidden), dtype
        self.row = seqlen * hidden * dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, n * self.row)

    def read(self, i: int, j: int, device) -> torch.Tensor:
        buf = torch.empty((j - i) * self.row, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):
            got += os.preadv(self.fd, [view[got:]], i * self.row + got)
        return buf.view(self.dtype).reshape(j - i, *self.shape).to(device, non_blocking=True)

    def write(self, i: int, value: torch.Tensor) -> None:
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], i * self.row + done)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)


def make_store(tier: str, n: int, seqlen: int, hidden: int, dtype, device, path: Path):
    device = torch.device(device)
    if tier == "gpu":
        return TensorStore(n, seqlen, hidden, dtype, device)
    if tier == "cpu":
        return TensorStore(n, seqlen, hidden, dtype, "cpu", pin=device.type == "cuda")
    if tier == "disk":
        return FileStore(path, n, seqlen, hidden, dtype)
    raise ValueError(tier)


class Activations:
    """This rank's calibration sequences as they flow through the blocks: the current block's inputs and
    outputs (two stores that swap after every block), and the keyword arguments each block is called with, per
    batch size. `batches` are this rank's (start, end) pairs in global sequence numbers."""

    def __init__(self, make, batches: list, kwargs: dict | None = None):
        self.batches = batches
        self.base = batches[0][0] if batches else 0
        self.count = sum(j1 - j0 for j0, j1 in batches)
        self.inputs, self.outputs = make("a", self.count), make("b", self.count)
        self.kwargs = kwargs or {}

    def local(self, j0: int, j1: int) -> tuple[int, int]:
        return j0 - self.base, j1 - self.base

    def swap(self) -> None:
        self.inputs, self.outputs = self.outputs, self.inputs

    def close(self) -> None:
        self.inputs.close()
        self.outputs.close()
