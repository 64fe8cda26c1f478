"""Progress for people and for logs: a tqdm bar when stderr is a terminal, plain lines when it is not (a job run
as `nohup streamprune prune ... > log 2>&1`, a pipe, a CI log), so a log holds no carriage returns or cursor
movements, only lines that say how far the job is."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

INTERVAL = 30.0  # seconds between the lines of a transient bar (one block's batches) when stderr is not a terminal


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def bar(iterable=None, *, enabled: bool = True, leave: bool = True, **kwargs):
    """A progress bar over `iterable` (or updated by hand with `total=`): tqdm on a terminal, `LineProgress`
    elsewhere, nothing at all when not `enabled`."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if stderr_is_terminal():
        return tqdm(iterable, leave=leave, dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, leave=leave, **kwargs)


class LineProgress:
    """tqdm's interface (iterate, `update`, `set_postfix`, `close`), written as whole lines on stderr. A bar that
    stays (`leave`, such as the job's blocks) prints a line per update; a transient one (one block's calibration
    batches) at most one line every INTERVAL seconds, so a long block still shows that the job is alive."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, initial: int = 0, unit: str = "it",
                 leave: bool = True, interval: float = INTERVAL, **_ignored):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.leave, self.interval = leave, interval
        self.postfix = ""
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.leave or now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed, done = now - self.t0, self.n - self.initial
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "")
        text += (f" {self.unit}s" if self.unit != "it" else "") + f", {elapsed:.1f}s"
        if self.total is not None and done > 0 and self.n < self.total:
            text += f", about {elapsed / done * (self.total - self.n):.0f}s left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        pass
