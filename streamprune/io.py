"""The job's only background thread. While block i computes, it writes block i-1's shard, commits that block
to the job state, and then reads block i+1. One thread, so these never overlap: besides the block being
computed, at most one block is held on the host (being written or read ahead), whatever the model's depth.
Writes and their commits run in submission order. With `overlap=False` everything runs in the foreground.
While it runs, the job state is changed and saved only on this thread (`then`): one writer.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .runtime import IO_THREAD


class BlockIO:
    def __init__(self, read: Callable[[int], dict], overlap: bool = True, phase=None):
        self._read_block = read
        self._phase = phase or (lambda name: nullcontext())  # the reads and writes are timed as observer phases
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=IO_THREAD) if overlap else None
        self._prefetch: tuple[int, Future] | None = None
        self._writes: list[Future] = []

    def read(self, i: int, ahead: int | None = None) -> dict:
        """Block i's host tensors; queues the read of block `ahead`."""
        if self._prefetch is not None and self._prefetch[0] == i:
            host = self._prefetch[1].result()
        else:
            host = self._read(i)
        self._prefetch = None
        if ahead is not None and self._pool is not None:
            self._prefetch = (ahead, self._pool.submit(self._read, ahead))
        return host

    def write(self, write: Callable[[], dict | None], then: Callable[[dict | None, float], None]) -> None:
        """Queue `write()` (it returns the file's record, or None), then `then(record, seconds)`."""
        self._raise_failed()
        if self._pool is None:
            self._run(write, then)
        else:
            self._writes.append(self._pool.submit(self._run, write, then))

    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn()` after every write queued so far, where their commits run (the I/O thread, or the foreground
        without overlap): what also saves the job state goes here, so the state has one writer."""
        self._raise_failed()
        if self._pool is None:
            fn()
        else:
            self._writes.append(self._pool.submit(fn))

    def _read(self, i: int) -> dict:
        with self._phase("read_block"):
            return self._read_block(i)

    def _run(self, write, then) -> None:
        t = time.perf_counter()
        with self._phase("write"):
            meta = write()
        then(meta, time.perf_counter() - t)

    def _raise_failed(self) -> None:
        done = [f for f in self._writes if f.done()]
        self._writes = [f for f in self._writes if not f.done()]
        for f in done:
            f.result()

    def flush(self) -> None:
        """Wait until every queued write has run (and raise its error, if any)."""
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()

    def __enter__(self) -> "BlockIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.flush()
        finally:
            if self._prefetch is not None:
                self._prefetch[1].cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # queued writes still run: a shard on disk is still committed
        return False
