"""The job's only threads: block i+1 is read while block i computes, and block i's shard is written while block
i+1 computes. A block is committed (its record handed to `commit`) only after its shard is on disk, and the
commits happen in block order on the calling thread. With `overlap=False` everything runs in the foreground.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class BlockIO:
    def __init__(self, read: Callable[[int], dict], write: Callable[[int, dict], dict],
                 commit: Callable[..., None], overlap: bool = True):
        self._read, self._write, self._commit = read, write, commit
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamprune-io") if overlap else None
        self._prefetch: tuple[int, Future] | None = None
        self._pending: tuple[Future, tuple] | None = None  # the block whose shard is being written

    def read(self, i: int, ahead: int | None = None) -> dict:
        """Block i's host tensors; starts reading block `ahead` in the background."""
        if self._prefetch is not None and self._prefetch[0] == i:
            host = self._prefetch[1].result()
        else:
            host = self._read(i)
        self._prefetch = None
        if ahead is not None and self._pool is not None:
            self._prefetch = (ahead, self._pool.submit(self._read, ahead))
        return host

    def write(self, i: int, tensors: dict | None, *commit_args) -> None:
        """Write block i's shard (None: nothing to write on this rank); `commit(meta, seconds, *commit_args)`
        runs once it is on disk. The previous block is committed first."""
        self.flush()
        if tensors is None:
            fut = _done((None, 0.0))
        elif self._pool is not None:
            fut = self._pool.submit(self._timed_write, i, tensors)
        else:
            fut = _done(self._timed_write(i, tensors))
        self._pending = (fut, commit_args)

    def _timed_write(self, i: int, tensors: dict):
        t = time.perf_counter()
        meta = self._write(i, tensors)
        return meta, time.perf_counter() - t

    def flush(self) -> None:
        """Wait for the pending write and commit its block."""
        if self._pending is not None:
            fut, args = self._pending
            self._pending = None
            meta, seconds = fut.result()
            self._commit(meta, seconds, *args)

    def __enter__(self) -> "BlockIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and self._pending is not None:
                try:  # an error elsewhere: still commit the block whose shard made it to disk
                    self.flush()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            else:
                self.flush()
        finally:
            if self._prefetch is not None:
                self._prefetch[1].cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return False
