"""Job state: what a prune job is (its fingerprint), what it has committed, and how to continue it.

Lives in OUT/.streamprune/state.json, replaced atomically (temporary name, fsync, rename) after every block,
so a crash at any instant leaves either the previous or the next state. Committed shard files carry their
sha256; an activation snapshot (the inputs of the next block) is kept every few blocks so a resume does not
have to recompute the whole prefix.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .errors import StreamPruneError
from .writer import fsync_dir, write_atomic

STATE_DIR = ".streamprune"
STATE_FILE = "state.json"
FORMAT = 1


def diff(old, new, path="") -> list[str]:
    """Human-readable differences between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else str(k))
        return out
    if old != new:
        short = lambda v: (str(v)[:40] + "...") if len(str(v)) > 43 else str(v)  # noqa: E731
        return [f"{path}: {short(old)} -> {short(new)}"]
    return []


class Job:
    def __init__(self, out: Path, data: dict, readonly: bool = False):
        self.out, self.data, self.readonly = Path(out), data, readonly
        self.rank_suffix = ""  # data-parallel ranks keep one activation snapshot file each

    @property
    def dir(self) -> Path:
        return self.out / STATE_DIR

    @classmethod
    def exists(cls, out: Path) -> bool:
        return (Path(out) / STATE_DIR / STATE_FILE).is_file()

    @classmethod
    def load(cls, out: Path) -> "Job":
        path = Path(out) / STATE_DIR / STATE_FILE
        try:
            data = json.loads(path.read_text())
            assert data.get("format") == FORMAT
        except (OSError, ValueError, AssertionError):
            raise StreamPruneError(f"{path}: unreadable job state; use --restart to discard the job") from None
        return cls(out, data)

    @classmethod
    def create(cls, out: Path, fingerprint: dict, options: dict, total_blocks: int) -> "Job":
        job = cls(out, {"format": FORMAT, "fingerprint": fingerprint, "options": options,
                        "total_blocks": total_blocks, "blocks": {}, "files": {}, "snapshot": None,
                        "block_sparsity": {}, "seconds": 0.0, "complete": False, "created": time.time()})
        job.dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(job.out)
        job.save()
        return job

    def save(self, hook=None) -> None:
        if self.readonly:  # ranks other than 0 follow the state in memory; rank 0 writes it
            return
        write_atomic(self.dir / STATE_FILE, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode(), hook)

    @property
    def committed(self) -> int:
        """Number of blocks committed: blocks 0..committed-1 are on disk, in order."""
        n = 0
        while str(n) in self.data["blocks"]:
            n += 1
        return n

    def commit_file(self, name: str, meta: dict) -> None:
        self.data["files"][name] = meta

    def commit_block(self, i: int, record: dict, seconds: float, hook=None) -> None:
        self.data["blocks"][str(i)] = record
        self.data["seconds"] += seconds
        self.save(hook)

    def snapshot_path(self, after_block: int) -> Path:
        return self.dir / f"activations-after-block-{after_block:05d}{self.rank_suffix}.bin"

    def set_snapshot(self, after_block: int, meta: dict, hook=None) -> None:
        old = self.data.get("snapshot")
        self.data["snapshot"] = dict(meta, after_block=after_block)
        self.save(hook)
        if old and old["after_block"] != after_block and not self.readonly:
            for f in self.dir.glob(f"activations-after-block-{old['after_block']:05d}*.bin"):
                f.unlink()

    def finish(self, hook=None) -> None:
        self.data["snapshot"] = None
        self.data["complete"] = True
        self.save(hook)
        for leftover in self.dir.glob("*.bin"):
            leftover.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict:
        done, total = self.committed, self.data["total_blocks"]
        blocks = [self.data["blocks"][str(i)] for i in range(done)]
        zeros = sum(l["zeros"] for b in blocks for l in b["linears"].values())
        numel = sum(l["numel"] for b in blocks for l in b["linears"].values())
        seconds = self.data["seconds"]
        snap = self.data.get("snapshot")
        return {"complete": self.data["complete"], "blocks_done": done, "blocks_total": total,
                "sparsity": zeros / numel if numel else 0.0, "seconds": seconds,
                "eta_seconds": (seconds / done * (total - done)) if done else None,
                "snapshot_after_block": snap["after_block"] if snap else None,
                "options": self.data["options"]}
