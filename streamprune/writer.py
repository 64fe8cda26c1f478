"""Writing the pruned checkpoint: safetensors shards and the index, each published atomically.

Shards are written by `safetensors.torch.save_file` (it releases the GIL and writes in place; measured here
with a 512 MB tensor: 0.3-1.4 s against 1.9 s for the hand-written writer it replaced, which hashed while
writing), under a temporary name; the file is then read back once for its sha256 (from the page cache), fsynced
and renamed, so a file with its final name is always complete. Bytes are deterministic for the same tensors
(safetensors orders them by dtype and name), which is what lets a resumed job prove it equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from .shards import INDEX_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
READ_CHUNK = 1 << 20


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: a race with the I/O thread's files)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def no_event(name: str, detail: str = "") -> None:
    pass


def publish(tmp: Path, path: Path, event=no_event) -> None:
    """fsync `tmp`, rename it to `path`, fsync the directory. `event("before_rename", name)` comes first."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    event("before_rename", path.name)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes, event=no_event) -> None:
    path, tmp = Path(path), temporary(Path(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path, event)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], event=no_event) -> dict:
    """Write one safetensors file; return {"size", "sha256"} of its bytes. Events: "mid_shard" (halfway
    through reading the written temporary back, before it is fsynced) and "before_rename"."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path, tmp = Path(path), temporary(Path(path))
    try:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # an I/O failure arrives as text: give it back its errno (ENOSPC matters)
            code = re.search(r"os error (\d+)", str(e))
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
            raise
        os.chmod(tmp, 0o666 & ~umask())  # safetensors creates its file 0600; a shard is as readable as any file
        size, digest = tmp.stat().st_size, hashlib.sha256()
        with open(tmp, "rb", buffering=0) as f:
            for done, chunk in _chunks(f):
                digest.update(chunk)
                if done - len(chunk) < size // 2 <= done:
                    event("mid_shard", path.name)
        publish(tmp, path, event)
    finally:
        tmp.unlink(missing_ok=True)
    st = path.stat()
    return {"size": size, "sha256": digest.hexdigest(), "stat": [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]}


def _chunks(f):
    """(bytes so far, chunk) over an unbuffered file, read into one small buffer: no large allocations left
    behind in malloc's heap by the writer thread."""
    view, done = memoryview(bytearray(READ_CHUNK)), 0
    while n := f.readinto(view):
        done += n
        yield done, view[:n]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for _, chunk in _chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def write_index(out: Path, weight_map: dict[str, str], total_size: int, event=no_event) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), event)


def copy_side_files(model_dir: Path, out: Path, event=no_event) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight files (top level only)."""
    copied = []
    for src in sorted(model_dir.iterdir()):
        if not src.is_file() or src.name.startswith(".") or src.name == INDEX_NAME or src.name.endswith(WEIGHT_SUFFIXES):
            continue
        dst = out / src.name
        tmp = temporary(dst)
        try:
            shutil.copyfile(src, tmp)
            publish(tmp, dst, event)
        finally:
            tmp.unlink(missing_ok=True)
        copied.append(src.name)
    return copied
