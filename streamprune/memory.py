"""Host memory: block-lifetime buffers that go back to the OS when freed, and measured peaks (RSS, GPU)."""

from __future__ import annotations

import ctypes
import math
import mmap
import threading

import psutil
import torch

OWN_MAPPING_BYTES = 1 << 20
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim
except (OSError, AttributeError):  # not glibc
    _LIBC = None


def host_empty(shape, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """An uninitialised host tensor for data that lives as long as one block (its weights as read, cast, or
    written). Large ones get an anonymous mapping of their own, returned to the OS the moment the last view of
    them is dropped, whatever malloc does with its heap; small ones, and pinned ones (CUDA's host allocator),
    come from torch as usual. Leaving malloc alone keeps the forward passes fast: a process-wide
    M_MMAP_THRESHOLD of 64 KiB, the previous way to keep peak RSS flat, made every activation of every op a
    fresh mapping and the SmolLM2 job 1.4x slower (benchmarks/allocator.py)."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if pin or nbytes < OWN_MAPPING_BYTES:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the default is a shared mapping
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).reshape(shape)


def trim() -> None:
    """Give malloc's free heap pages back to the OS (glibc); called between blocks."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _vm_hwm() -> int | None:
    """The kernel's own peak RSS of this process (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryMonitor:
    """Samples RSS with psutil in a background thread; anonymous = rss - shared (file-backed) pages. The peak RSS
    reported is the kernel's own high-water mark (VmHWM), exact whatever the interval; the samples only split it.
    Every 0.1 s (it was 0.02 s): each wake-up takes a core from the compute threads for a moment."""

    def __init__(self, interval: float = 0.1, device=None):
        self.interval, self.device = interval, torch.device(device) if device else None
        self.proc = psutil.Process()
        self.peak_rss = self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        m = self.proc.memory_info()
        shared = getattr(m, "shared", 0)
        self.peak_rss = max(self.peak_rss, m.rss)
        self.peak_anon = max(self.peak_anon, m.rss - shared)
        self.peak_file = max(self.peak_file, shared)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False

    def report(self) -> dict:
        out = {"peak_rss_bytes": max(self.peak_rss, _vm_hwm() or 0), "peak_rss_sampled_bytes": self.peak_rss,
               "peak_anon_bytes": self.peak_anon, "peak_file_backed_bytes": self.peak_file, "peak_gpu_bytes": None}
        if self.device is not None and self.device.type == "cuda":
            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out
