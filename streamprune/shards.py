"""Reading a safetensors checkpoint one tensor at a time, into buffers this process owns.

Why not `safetensors.safe_open`: its default backend memory-maps the file, and one surviving view keeps the
whole mapped shard resident, even after the file is closed; its `pread` backend (0.8) copies, but holds the GIL for the
whole read. Measured here, reading a 512 MB tensor in a background thread: a Python loop in the main thread ran
44k-79k iterations during the safetensors read and 855k-947k during the positioned reads below, which release
the GIL in `readinto`; the read-ahead thread must not stall the forward passes. Its header API exposes no data
offsets, so headers are parsed here too, and validated up front: a truncated or corrupt shard is reported
before any work starts. Writing does use safetensors (writer.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamPruneError
from .memory import host_empty

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {  # safetensors' dtype codes
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int


def _parse_header(path: Path) -> tuple[dict, bytes, int]:
    """Return (header dict, raw header bytes, data start) after checking the file can hold what it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StreamPruneError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise StreamPruneError(f"{path}: corrupt safetensors header (declared length {n}, file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise StreamPruneError(f"{path}: corrupt safetensors header (not a JSON object)") from None
    return header, raw, 8 + n


class Checkpoint:
    """The tensors of a local Hugging Face checkpoint directory, by name, without loading any of them."""

    def __init__(self, path: str | os.PathLike, shard_names: list[str] | None = None):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if shard_names is not None:  # explicit files (a job's own committed shards), no index
            weight_map = None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise StreamPruneError(f"{index}: not a valid safetensors index (no weight_map)") from None
            shard_names = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).is_file():
            weight_map, shard_names = None, [SINGLE_NAME]
        else:
            raise StreamPruneError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are supported)")

        self.hash_seconds = 0.0  # spent hashing what was read (the job's record of its inputs)
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: dict[str, dict] = {}  # shard name -> {"size", "header_sha256"}
        for shard in shard_names:
            file = self.path / shard
            if not file.is_file():
                raise StreamPruneError(f"{file}: shard named in {INDEX_NAME} is missing")
            header, raw, start = _parse_header(file)
            size = file.stat().st_size
            self.shards[shard] = {"size": size, "header_sha256": hashlib.sha256(raw).hexdigest()}
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                info = self._tensor_info(file, shard, name, meta, start, size)
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # the index is authoritative about which copy counts
                self.tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise StreamPruneError(f"{self.path}: tensor {missing[0]} is in {INDEX_NAME} but not in {weight_map[missing[0]]}")

    @staticmethod
    def _tensor_info(file: Path, shard: str, name: str, meta, start: int, size: int) -> TensorInfo:
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StreamPruneError(f"{file}: corrupt safetensors header entry for {name}") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise StreamPruneError(f"{file}: corrupt safetensors header: {name} has {end - begin} bytes for shape {list(shape)}")
        if start + end > size:
            raise StreamPruneError(f"{file}: truncated shard: {name} ends at byte {start + end}, file has {size}")
        return TensorInfo(name, shard, dtype, shape, start + begin, nbytes)

    def read(self, name: str, pin: bool = False, digest=None) -> torch.Tensor:
        """An owned host copy of one tensor (in pinned memory when `pin`), see memory.host_empty. With `digest`
        (a hashlib object), its name and bytes are hashed as they arrive: the job's record of its inputs."""
        info = self.tensors[name]
        buf = host_empty((info.nbytes,), torch.uint8, pin=pin)
        if info.nbytes:
            view = memoryview(buf.numpy())
            with open(self.path / info.shard, "rb", buffering=0) as f:
                f.seek(info.offset)
                got = 0
                while got < info.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise StreamPruneError(f"{self.path / info.shard}: truncated shard while reading {name}")
                    got += n
        if digest is not None:
            t = time.perf_counter()
            digest.update(name.encode() + b"\0")
            digest.update(memoryview(buf.numpy()))
            self.hash_seconds += time.perf_counter() - t
        return buf.view(info.dtype).reshape(info.shape)

    def identity(self) -> dict:
        """Per shard file: (size, mtime_ns, inode, ctime_ns). Any write to a file changes its ctime, so equal
        identities mean unchanged contents; changed ones call for hashing the contents again."""
        out = {}
        for shard in sorted(self.shards):
            st = (self.path / shard).stat()
            out[shard] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        return out

    def fingerprint(self) -> dict:
        """What identifies this checkpoint's contents cheaply: shard names, sizes and header hashes."""
        return {name: dict(meta) for name, meta in sorted(self.shards.items())}

    @property
    def dtype(self) -> torch.dtype:
        """The dominant floating dtype of the checkpoint (by bytes)."""
        totals: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                totals[t.dtype] = totals.get(t.dtype, 0) + t.nbytes
        return max(totals, key=totals.get) if totals else torch.float32
