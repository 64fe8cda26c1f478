"""Where a job's next block gets its inputs: block 0's from the model's own forward, a later block's from an
activation snapshot plus a replay through the committed (pruned) blocks on disk, or from a replay of every
committed block, whichever the measured per-block forward time says is cheaper.

Snapshots (the inputs of block i+1, saved after block i) are taken every `--snapshot-every` blocks and when a
signal stops the job; each rank saves its own sequences.
"""

from __future__ import annotations

import time

import torch

from .errors import StreamPruneError
from .units import human_bytes
from .shards import Checkpoint
from .state import Snapshot
from .writer import publish, temporary

SNAPSHOT_READ_BPS = 500e6  # a conservative sequential read speed for choosing snapshot vs replay


def _forward_seconds(state, start: int) -> float:
    """Measured seconds of one propagation pass per block, from the committed blocks' records."""
    times = [state.blocks[i].phase_seconds.get("propagate", 0.0) for i in range(start)]
    return sum(times) / len(times) if times else 0.0


def block_inputs(job, start: int, acts) -> None:
    """Fill `acts` (inputs and call kwargs) with what block `start` needs."""
    state, jobdir, rt, log = job.state, job.jobdir, job.rt, job.obs.log
    snap = state.snapshot
    usable = snap is not None and snap.after_block < start and jobdir.snapshot_path(snap.after_block).is_file()
    usable = not rt.dist.any(not usable)  # every rank needs its own file
    if usable and start:
        fwd = _forward_seconds(state, start)
        via_snapshot = snap.size / SNAPSHOT_READ_BPS + (start - 1 - snap.after_block) * fwd
        usable = via_snapshot <= start * fwd
        log(f"resume: inputs of block {start} via the snapshot after block {snap.after_block} "
            f"(est. {via_snapshot:.1f}s) or by replaying {start} blocks (est. {start * fwd:.1f}s): "
            f"{'snapshot' if usable else 'replay'}")
    captured = job.capture(acts.batches, only_kwargs=usable)
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
        done = Checkpoint(job.spec.out, [state.blocks[i].file for i in range(first, start)])
        for i in range(first, start):
            block, _ = job.model.load_block(i, {n: done.read(n) for n in job.model.block_names(i)})
            job.loop.forward_all(block, i, acts, "recompute")
            job.model.release_block(i)
            acts.swap()
        log(f"resume: recomputed the inputs of block {start} through committed blocks {first}-{start - 1} "
            f"({start - first} forward passes, {time.perf_counter() - t:.1f}s)")


def save_snapshot(job, after_block: int, store, acts) -> Snapshot:
    """This rank's sequences in `store` (the inputs of block after_block + 1), written atomically."""
    t = time.perf_counter()
    path = job.jobdir.snapshot_path(after_block)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            for j0, j1 in acts.batches:
                a, b = acts.local(j0, j1)
                f.write(memoryview(store.read(a, b, "cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        publish(tmp, path, job.obs.event)
    finally:
        tmp.unlink(missing_ok=True)
    job.rt.dist.barrier()  # every rank's file is on disk before rank 0 records the snapshot
    job.obs.add("snapshot", time.perf_counter() - t)
    return Snapshot(after_block, path.stat().st_size)


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


def snapshot_after(job, i: int, acts) -> Snapshot | None:
    """Every `--snapshot-every` blocks (not after the last) save the next block's inputs."""
    k = job.spec.options.snapshot_every
    if acts is None or i == job.n_blocks - 1 or not (k and (i + 1) % k == 0):
        return None
    return save_snapshot(job, i, acts.outputs, acts)


def keep_inputs_on_stop(job, acts) -> None:
    """On a signal, keep the next block's inputs so the resume needs no recomputation."""
    done, snap = job.state.committed, job.state.snapshot
    if acts is None or done == 0 or done == job.n_blocks or (snap and snap.after_block == done - 1):
        return
    job.state.snapshot = save_snapshot(job, done - 1, acts.inputs, acts)
    if job.rt.dist.main:
        job.jobdir.save(job.state, job.obs.event)
        job.jobdir.drop_snapshots(before=done - 1)
