"""What a job needs to continue: the same input weights as before, and the inputs of its next block.

Block 0's inputs come from the model's own forward; a later block's from an activation snapshot plus a replay
through the committed (pruned) blocks on disk, or from a replay of every committed block, whichever the
measured per-block forward time says is cheaper. Snapshots (the inputs of block i+1, saved after block i) are
taken every `--snapshot-every` blocks and when a signal stops the job; each rank saves its own sequences, with
its sha256, so a damaged snapshot is noticed and replaced by a replay.
"""

from __future__ import annotations

import hashlib
import time

import torch

from .errors import StreamPruneError
from .shards import Checkpoint
from .state import Snapshot
from .units import human_bytes
from .writer import publish, temporary

SNAPSHOT_READ_BPS = 500e6  # a conservative sequential read speed for choosing snapshot vs replay


def verify_inputs(state, ckpt: Checkpoint, model, copy_groups: dict, log) -> None:
    """The committed blocks were computed from the input as it was; resuming on changed weights would mix two
    revisions. When the input shards' identities (size, mtime, inode, ctime) moved since the job last looked,
    everything committed so far (`model`'s blocks, the tensors `copy_groups` copied) is read and hashed again and
    compared with what `state` recorded."""
    now = ckpt.identity()
    if now == state.inputs:
        return
    t, nbytes = time.perf_counter(), 0
    for i in range(state.committed):
        _, digest = model.read_block(i)
        nbytes += sum(ckpt.tensors[n].nbytes for n in model.block_names(i))
        if digest != state.blocks[i].input_sha256:
            raise StreamPruneError(f"{ckpt.path}: the weights of block {i} changed since this job started; "
                                   f"resuming would mix two revisions: add --restart to prune the weights now there")
    for name, group in copy_groups.items():
        meta = state.files.get(name)
        if meta:
            digest = hashlib.sha256()
            for tensor in group:
                ckpt.read(tensor, digest=digest)
                nbytes += ckpt.tensors[tensor].nbytes
            if digest.hexdigest() != meta.get("input_sha256"):
                raise StreamPruneError(f"{ckpt.path}: tensors copied into {name} changed since this job "
                                       f"started; add --restart to prune the weights now there")
    state.inputs = now
    log(f"resume: the input files changed on disk since the job last checked them; what the committed "
                f"blocks read is unchanged (hashed {human_bytes(nbytes)} again in {time.perf_counter() - t:.1f}s)")


def _forward_seconds(state, start: int) -> float:
    """Measured seconds of one propagation pass per block, from the committed blocks' records."""
    times = [state.blocks[i].phase_seconds.get("propagate", 0.0) for i in range(start)]
    return sum(times) / len(times) if times else 0.0


def _snapshot_intact(path, snap: Snapshot, rank: int, log) -> bool:
    if not path.is_file() or path.stat().st_size != snap.sizes[rank]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != snap.sha256[rank]:
        log(f"resume: {path.name} is damaged (sha256 differs); its inputs are recomputed instead")
        return False
    return True


def block_inputs(start: int, acts, state, jobdir, dist, capture, replay, log) -> None:
    """Fill `acts` (inputs and call kwargs) with what block `start` needs: block 0's from `capture(batches,
    only_kwargs)` (the model's own forward), then either this rank's snapshot in `jobdir` or `replay(first, stop,
    acts)` (the forward through committed blocks first..stop-1 as written), whichever is cheaper."""
    snap = state.snapshot
    usable = snap is not None and snap.after_block < start and _snapshot_intact(
        jobdir.snapshot_path(snap.after_block), snap, dist.rank, log)
    usable = not dist.any(not usable)  # every rank needs its own file
    if usable and start:
        fwd, size = _forward_seconds(state, start), max(snap.sizes)
        via_snapshot = size / SNAPSHOT_READ_BPS + (start - 1 - snap.after_block) * fwd
        usable = via_snapshot <= start * fwd
        log(f"resume: inputs of block {start} via the snapshot after block {snap.after_block} "
            f"(est. {via_snapshot:.1f}s) or by replaying {start} blocks (est. {start * fwd:.1f}s): "
            f"{'snapshot' if usable else 'replay'}")
    captured = capture(acts.batches, only_kwargs=usable)
    acts.kwargs = captured.kwargs
    if usable:
        t = time.perf_counter()
        load_snapshot(jobdir.snapshot_path(snap.after_block), acts)
        first = snap.after_block + 1
        log(f"resume: loaded the activations saved after block {snap.after_block} "
            f"({human_bytes(snap.size)}) in {time.perf_counter() - t:.1f}s")
    else:
        for (j0, j1), h in zip(acts.batches, captured.inputs):
            acts.inputs.write(acts.local(j0, j1)[0], h)
        first = 0
    del captured
    if first < start:
        t = time.perf_counter()
        replay(first, start, acts)
        log(f"resume: recomputed the inputs of block {start} through committed blocks {first}-{start - 1} "
            f"({start - first} forward passes, {time.perf_counter() - t:.1f}s)")


def save_snapshot(after_block: int, store, acts, jobdir, dist, obs) -> Snapshot:
    """This rank's sequences in `store` (the inputs of block after_block + 1), written atomically with their
    sha256 into `jobdir`; every rank's size and hash are gathered (a collective: every rank calls it at the same
    point)."""
    t = time.perf_counter()
    path = jobdir.snapshot_path(after_block)
    tmp, digest, size = temporary(path), hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for j0, j1 in acts.batches:
                a, b = acts.local(j0, j1)
                data = memoryview(store.read(a, b, "cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)
                size += len(data)
        publish(tmp, path, obs.event)
    finally:
        tmp.unlink(missing_ok=True)
    sizes, hashes = zip(*dist.gather((size, digest.hexdigest())))
    obs.add("snapshot", time.perf_counter() - t)
    return Snapshot(after_block, list(sizes), list(hashes))


def load_snapshot(path, acts) -> None:
    store = acts.inputs
    (seqlen, hidden), dtype = store.shape, store.dtype
    row = seqlen * hidden * dtype.itemsize
    if path.stat().st_size != row * acts.count:
        raise StreamPruneError(f"{path}: activation snapshot has the wrong size; use --restart")
    with open(path, "rb") as f:
        for j0, j1 in acts.batches:
            a, b = acts.local(j0, j1)
            buf = torch.empty((b - a) * row, dtype=torch.uint8)
            f.readinto(memoryview(buf.numpy()))
            store.write(a, buf.view(dtype).reshape(b - a, seqlen, hidden))


def snapshot_after(i: int, acts, every: int, n_blocks: int, jobdir, dist, obs) -> Snapshot | None:
    """Every `every` (--snapshot-every) blocks, not after the last, save the next block's inputs."""
    if acts is None or i == n_blocks - 1 or not (every and (i + 1) % every == 0):
        return None
    return save_snapshot(i, acts.outputs, acts, jobdir, dist, obs)


def keep_inputs_on_stop(acts, state, n_blocks: int, jobdir, dist, obs) -> None:
    """On a signal, keep the next block's inputs (recorded in `state`, saved in `jobdir`) so the resume needs no
    recomputation."""
    done, snap = state.committed, state.snapshot
    if acts is None or done == 0 or done == n_blocks or (snap and snap.after_block == done - 1):
        return
    state.snapshot = save_snapshot(done - 1, acts.inputs, acts, jobdir, dist, obs)
    if dist.main:
        jobdir.save(state, obs.event)
        jobdir.drop_snapshots(before=done - 1)
