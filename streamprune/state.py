"""Job state: what a prune job is (its fingerprint), what it has committed, and what it needs to continue.

Lives in OUT/.streamprune/state.json, replaced atomically (temporary name, fsync, rename) after every block,
so a crash at any instant leaves the previous or the next state. Committed shard files carry their sha256;
an activation snapshot (the inputs of the next block) is kept every few blocks so a resume does not have to
recompute the whole prefix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import StreamPruneError
from .shards import INDEX_NAME
from .writer import file_sha256, fsync_dir, no_event, write_atomic

STATE_DIR = ".streamprune"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
LOCK_TRIES = 10  # 20 ms apart
FORMAT = 2


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


@dataclass
class BlockRecord:
    file: str
    sparsity: float
    target: float
    linears: dict            # linear name -> {"zeros" (written), "numel", "masked" (by the mask; absent: = zeros)}
    seconds: float = 0.0
    phase_seconds: dict = field(default_factory=dict)
    input_sha256: str = ""   # of the block's tensors as read from the input (see StreamedModel.read_block)
    experts: int = 0         # experts pruned
    fallback: int = 0        # experts pruned with the all-tokens statistics (BlockLoop.fallback)

    @property
    def zeros(self) -> int:
        return sum(v["zeros"] for v in self.linears.values())

    @property
    def numel(self) -> int:
        return sum(v["numel"] for v in self.linears.values())

    @property
    def masked(self) -> int:
        return sum(v.get("masked", v["zeros"]) for v in self.linears.values())


@dataclass
class Snapshot:
    after_block: int
    sizes: list     # per rank
    sha256: list    # per rank: a damaged snapshot is noticed, and the inputs recomputed instead

    @property
    def size(self) -> int:
        return sum(self.sizes)


@dataclass
class JobState:
    fingerprint: dict
    options: dict
    total_blocks: int
    blocks: dict = field(default_factory=dict)    # block index -> BlockRecord
    files: dict = field(default_factory=dict)     # file name -> {"size", "sha256", "stat", ["input_sha256"]}
    inputs: dict = field(default_factory=dict)    # input shard -> its identity when last verified (Checkpoint.identity)
    snapshot: Snapshot | None = None
    profile: dict | None = None                   # a sweeping profile's scores and per-block sparsities
    seconds: float = 0.0
    complete: bool = False
    created: float = field(default_factory=time.time)

    @property
    def committed(self) -> int:
        """Blocks 0..committed-1 are on disk, in order."""
        n = 0
        while n in self.blocks:
            n += 1
        return n

    def commit(self, i: int, record: BlockRecord, meta: dict) -> None:
        self.files[record.file] = meta
        self.blocks[i] = record
        self.seconds += record.seconds

    def forget_from(self, i: int) -> None:
        for j in [j for j in self.blocks if j >= i]:
            del self.blocks[j]

    def sparsity(self) -> float:
        """The zeros written (as `report` counts them) over the pruned weights' entries."""
        zeros = sum(b.zeros for b in self.blocks.values())
        numel = sum(b.numel for b in self.blocks.values())
        return zeros / numel if numel else 0.0

    def mask_sparsity(self) -> float:
        """The zeros the methods' masks chose (what was asked for); `sparsity` adds those from the data."""
        masked = sum(b.masked for b in self.blocks.values())
        numel = sum(b.numel for b in self.blocks.values())
        return masked / numel if numel else 0.0

    def status(self) -> dict:
        done, total = self.committed, self.total_blocks
        return {"complete": self.complete, "blocks_done": done, "blocks_total": total, "sparsity": self.sparsity(),
                "mask_sparsity": self.mask_sparsity(),
                "seconds": self.seconds, "eta_seconds": (self.seconds / done * (total - done)) if done else None,
                "snapshot_after_block": self.snapshot.after_block if self.snapshot else None,
                "options": self.options}

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        d["blocks"] = {str(i): asdict(b) for i, b in sorted(self.blocks.items())}
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "JobState":
        d = json.loads(text)
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        d["blocks"] = {int(i): BlockRecord(**b) for i, b in d["blocks"].items()}
        d["snapshot"] = Snapshot(**d["snapshot"]) if d["snapshot"] else None
        return cls(**d)


class JobDir:
    """The job store, OUT/.streamprune (the state file, activation snapshots, the activation cache files): a job
    is opened (`open`: fresh, or the existing one with the same fingerprint), held (`locked`), verified (`verify`:
    committed files against their records), committed to (`save` after `JobState.commit`), and judged complete
    or damaged (`problems`) by the job, `status` and `resume` alike."""

    def __init__(self, out, rank: int = 0, world: int = 1):
        self.out = Path(out)
        self.dir = self.out / STATE_DIR
        self.rank = rank
        self.rank_suffix = f".rank{rank}" if world > 1 else ""  # data-parallel ranks keep a snapshot file each

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def exists(self) -> bool:
        return self.state_path.is_file()

    def foreign(self) -> list[Path]:
        """What OUT holds besides a streamprune job's own files (none of these: OUT counts as empty)."""
        if not self.out.is_dir() or self.exists():
            return []
        return [p for p in self.out.iterdir() if p.name != STATE_DIR and not (p.name.startswith(".") and
                                                                                p.name.endswith(".tmp"))]

    @contextmanager
    def locked(self):
        """Hold OUT for this job: an exclusive flock on OUT/.streamprune/lock that the kernel drops when the process
        ends however it ends. A second job on the same OUT is refused, naming the holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_TRIES):  # `holder()` of a status or resume holds a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == LOCK_TRIES:
                    holder = _pid_in(fd)
                    os.close(fd)
                    raise StreamPruneError(self.in_use(holder)) from None
                time.sleep(0.02)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def in_use(self, holder: str) -> str:
        return f"OUT {self.out} is in use by another streamprune job (pid {holder}); wait for it to finish or stop it"

    def holder(self) -> str | None:
        """The pid of the job holding OUT's lock (as it wrote it), or None when no job holds it. Creates nothing;
        the probe holds a shared lock for an instant (`locked` retries over that)."""
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def unfinished(self) -> str | None:
        """Why OUT is not a checkpoint to read yet: a job running there, or one stopped before its end (an OUT
        with an index is complete, whatever else it holds); None otherwise."""
        if (self.out / INDEX_NAME).is_file():
            return None
        pid, state = self.holder(), self.load() if self.exists() else None
        done = f"{state.committed} of {state.total_blocks} blocks committed" if state else "starting"
        if pid is not None:
            return (f"{self.out}: a streamprune job is still running there (pid {pid}, {done}); "
                    f"`streamprune status {self.out}` shows its progress")
        if state is not None and not state.complete:
            return (f"{self.out}: its streamprune job is not finished ({done}); `streamprune resume {self.out}` "
                    f"finishes it, `streamprune status {self.out}` shows its progress")
        return None

    def load(self) -> JobState:
        try:
            return JobState.from_json(self.state_path.read_text())
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise StreamPruneError(f"{self.state_path}: unreadable job state; use --restart to discard the job") from None

    def create(self, state: JobState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.out)
        self.save(state)

    def save(self, state: JobState, event=no_event) -> None:
        write_atomic(self.state_path, state.to_json().encode(), event)

    def snapshot_path(self, after_block: int) -> Path:
        return self.dir / f"activations-after-block-{after_block:05d}{self.rank_suffix}.bin"

    def cache_path(self, tag: str) -> Path:
        return self.dir / f"cache-{tag}-rank{self.rank}.bin"

    def drop_snapshots(self, before: int | None = None) -> None:
        """Remove every rank's snapshot files taken after a block earlier than `before` (all when None); a newer
        snapshot being written meanwhile is never touched."""
        for f in self.dir.glob("activations-after-block-*.bin"):
            if before is None or int(f.name.split("-")[3][:5]) < before:
                f.unlink(missing_ok=True)

    def clear_out(self, event=no_event) -> None:
        """Empty OUT (--overwrite, --restart): the index first (an OUT with an index must be complete, at every
        instant), then everything else but the lock this job holds. `event("clear", name)` after each removal."""
        index = self.out / INDEX_NAME
        if index.exists() or index.is_symlink():
            index.unlink()
            fsync_dir(self.out)
            event("clear", INDEX_NAME)
        for entry in self.out.iterdir():
            if entry.name == STATE_DIR and entry.is_dir() and not entry.is_symlink():
                for inner in entry.iterdir():
                    if inner.name != LOCK_FILE:
                        _remove(inner)
            else:
                _remove(entry)
            event("clear", entry.name)

    def open(self, fingerprint: dict, options: dict, total_blocks: int, *, restart: bool, overwrite: bool,
             inputs: dict, event=no_event) -> tuple[JobState, bool]:
        """A fresh job, or the existing one when its fingerprint matches. Returns (state, resumed)."""
        out = self.out
        if self.exists() and (restart or overwrite):
            self.clear_out(event)
        elif self.exists():
            state = self.load()
            changes = diff(state.fingerprint, fingerprint)
            if changes:
                raise StreamPruneError(f"{out} holds a job with different inputs ({'; '.join(changes[:4])}); "
                                       f"rerun with the original arguments to resume, or add --restart to discard it")
            return state, True
        elif self.foreign():
            if not overwrite:
                raise StreamPruneError(f"OUT {out} is not empty; choose an empty directory or add --overwrite")
            self.clear_out(event)
        out.mkdir(parents=True, exist_ok=True)
        state = JobState(fingerprint=fingerprint, options=options, total_blocks=total_blocks, inputs=inputs)
        self.create(state)
        return state, False

    def verify(self, state: JobState, copy_files: list[str], log) -> int:
        """Check the committed files against their records; a missing or altered copied shard is forgotten (it is
        written again), a missing or altered block rolls the job back to before it. Returns the first block to compute."""
        for name in copy_files:
            if name in state.files and not self.file_ok(name, state.files[name]):
                log(f"resume: {name} is missing or altered; writing it again")
                del state.files[name]
        n = state.committed
        for i in range(n):
            name = state.blocks[i].file
            if not self.file_ok(name, state.files.get(name)):
                log(f"resume: {name} is missing or altered; redoing from block {i}")
                state.forget_from(i)
                return i
        return n

    def damaged(self, state: JobState) -> list[str]:
        """The recorded files of a job that are missing or altered (hashed again only where a file's identity moved)."""
        return [name for name, meta in sorted(state.files.items()) if not self.file_ok(name, meta)]

    def problems(self, state: JobState) -> list[str]:
        """What keeps the job in OUT from being what its state says: its recorded files missing or altered, and for a
        complete job its index missing (an OUT with an index is complete). The one test of "complete" that the job,
        `status` and `resume` share."""
        bad = self.damaged(state)
        if state.complete and not bad and not (self.out / INDEX_NAME).is_file():
            bad = [INDEX_NAME]
        return bad

    def file_ok(self, name: str, meta: dict | None) -> bool:
        """Is the committed file `name` the one recorded? Its sha256 is recomputed only when the file's identity
        (size, mtime, inode, ctime) differs from the one recorded when it was written or last checked."""
        path = self.out / name
        if not meta or not path.is_file():
            return False
        now = file_identity(path)
        if meta.get("stat") == now:
            return True
        ok = now[0] == meta["size"] and file_sha256(path) == meta["sha256"]
        if ok:
            meta["stat"] = now
        return ok


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def file_identity(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def fingerprint(spec, ckpt, windows, ranks: int, experts_as_written: bool = False) -> dict:
    """Everything that determines the output: a job in OUT with another fingerprint is not this job. The options
    are those declared to change the output (options.output_keys); `experts_as_written`: experts streamed in
    groups propagate through their weights as written (job.py), so a job is not resumed across the two."""
    import torch
    import transformers

    from .version import __version__
    from .options import output_keys

    o = spec.options
    options = {k: getattr(o, k) for k in output_keys()}
    options.update(dtype=str(spec.dtype).replace("torch.", ""), structure=str(spec.structure),
                   device_type=spec.device.type, ranks=ranks)
    if experts_as_written:
        options["experts_propagate_as_written"] = True
    if o.calib_dataset and windows is not None:  # recorded only when used: other jobs' fingerprints stay as they were
        from .calibration import canonical_dataset

        options.update(calib_dataset=canonical_dataset(o.calib_dataset), calib_column=o.calib_column)
    fp = {"checkpoint": ckpt.fingerprint(),
          "config_sha256": hashlib.sha256((spec.model.path / "config.json").read_bytes()).hexdigest(),
          "options": options,
          "versions": {"streamprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}}
    if windows is not None:
        fp["calibration_sha256"] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return fp


def stored_options(spec) -> dict:
    """The options `streamprune resume` runs the job with again (paths made absolute)."""
    o = spec.options
    options = {k: v for k, v in o.as_dict().items() if k not in ("overwrite", "restart", "progress")}
    options["model"] = str(spec.model.path.resolve())
    options["calib"] = str(Path(o.calib).resolve()) if o.calib else None
    if o.calib_dataset:
        from .calibration import canonical_dataset

        options["calib_dataset"] = canonical_dataset(o.calib_dataset)
    return options
