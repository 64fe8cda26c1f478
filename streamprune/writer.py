"""Writing the pruned checkpoint: safetensors shards streamed tensor by tensor, published atomically.

Every file is written under a temporary name, fsynced, then renamed into place, so a file with its final
name is always complete. Bytes are deterministic (tensors sorted by name, fixed header layout), which is
what lets a resumed job prove it equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from .shards import DTYPE_NAMES, INDEX_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Atomic:
    """Open `path` for writing under a temporary name; on success fsync and rename, on failure remove."""

    def __init__(self, path: Path, hook=None):
        self.path, self.tmp, self.hook = Path(path), Path(path).with_name(f".{Path(path).name}.tmp"), hook

    def __enter__(self):
        self.f = open(self.tmp, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        if self.hook:
            self.hook("before_rename", self.path.name)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return False


def write_atomic(path: Path, data: bytes, hook=None) -> None:
    with _Atomic(path, hook) as f:
        f.write(data)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], hook=None) -> dict:
    """Write one safetensors file; return {"size", "sha256"} of exactly the bytes written."""
    names = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with _Atomic(path, hook) as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for k, name in enumerate(names):
            data = memoryview(tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
            if hook and k == len(names) // 2:
                hook("mid_shard", path.name)
    return {"size": 8 + len(raw) + offset, "sha256": digest.hexdigest()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_index(out: Path, weight_map: dict[str, str], total_size: int, hook=None) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), hook)


def copy_side_files(model_dir: Path, out: Path) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight files (top level only)."""
    copied = []
    for src in sorted(model_dir.iterdir()):
        if not src.is_file() or src.name.startswith(".") or src.name == INDEX_NAME or src.name.endswith(WEIGHT_SUFFIXES):
            continue
        with _Atomic(out / src.name) as f, open(src, "rb") as g:
            shutil.copyfileobj(g, f)
        copied.append(src.name)
    return copied
