"""The process a job runs in: its environment (read once, here), the process-wide settings a job changes (and
gives back), the signals that stop it at a safe point, and the observer that sees what it does.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import progress
from .distributed import Dist
from .errors import Interrupted

IO_THREAD = "streamprune-io"  # the name of io.py's background thread


@dataclass(frozen=True)
class ProcessEnv:
    """Everything a job reads from the environment: torchrun's rank variables and the test fault hook."""
    rank: int = 0
    local_rank: int | None = None
    world: int = 1
    dist_timeout: float = 600.0
    fault_at: str | None = None      # STREAMPRUNE_FAULT_AT=event:k
    fault_signal: str = "KILL"       # STREAMPRUNE_FAULT_SIGNAL
    fault_rank: int | None = None    # STREAMPRUNE_FAULT_RANK: only this rank is hit
    fault_hold: str | None = None    # STREAMPRUNE_FAULT_HOLD=event:thread:k:until

    @classmethod
    def read(cls, environ=os.environ) -> "ProcessEnv":
        get = environ.get
        return cls(rank=int(get("RANK", "0")), local_rank=int(get("LOCAL_RANK")) if "LOCAL_RANK" in environ else None,
                   world=int(get("WORLD_SIZE", "1")), dist_timeout=float(get("STREAMPRUNE_DIST_TIMEOUT", "600")),
                   fault_at=get("STREAMPRUNE_FAULT_AT"), fault_signal=get("STREAMPRUNE_FAULT_SIGNAL", "KILL"),
                   fault_rank=int(get("STREAMPRUNE_FAULT_RANK")) if "STREAMPRUNE_FAULT_RANK" in environ else None,
                   fault_hold=get("STREAMPRUNE_FAULT_HOLD"))


class Fault:
    """Test hooks at named events. STREAMPRUNE_FAULT_AT=event:k sends a real signal to this process at the k-th
    occurrence of `event` (tests kill jobs at exact points this way). STREAMPRUNE_FAULT_HOLD=event:thread:k:until
    holds a thread (`main`, or `io`: the background I/O thread) at its k-th occurrence of `event` until `until` has
    happened on any thread (at most HOLD_SECONDS): two threads' steps put in a chosen order. Renames are told apart
    by the file: rename_state, rename_index, rename_shard, rename_file."""

    HOLD_SECONDS = 120.0

    def __init__(self, event: str | None = None, k: int = 0, sig: int | None = None, hold: str | None = None):
        self.event, self.k, self.sig, self.seen = event, k, sig, 0
        self.hold = None
        if hold:
            event, thread, k, until = hold.split(":")
            self.hold = (event, thread, int(k), until)
            self.held_seen, self.released = 0, threading.Event()

    @classmethod
    def from_env(cls, env: ProcessEnv) -> "Fault | None":
        if (not env.fault_at and not env.fault_hold) or (env.fault_rank is not None and env.fault_rank != env.rank):
            return None
        event, k = env.fault_at.rsplit(":", 1) if env.fault_at else (None, 0)
        return cls(event, int(k), getattr(signal, "SIG" + env.fault_signal), env.fault_hold)

    def __call__(self, event: str, detail: str) -> None:
        if event == "before_rename":
            event = ("rename_state" if detail == "state.json" else "rename_index" if detail.endswith(".index.json")
                     else "rename_shard" if detail.endswith(".safetensors") else "rename_file")
        if self.hold is not None:
            self._hold(event)
        if event == self.event:
            self.seen += 1
            if self.seen == self.k:
                os.kill(os.getpid(), self.sig)

    def _hold(self, event: str) -> None:
        name, thread, k, until = self.hold
        if event == until:
            self.released.set()
        current = threading.current_thread()
        here = ("main" if current is threading.main_thread() else
                "io" if current.name.startswith(IO_THREAD) else current.name)
        if event == name and here == thread:
            self.held_seen += 1
            if self.held_seen == k:
                self.released.wait(self.HOLD_SECONDS)


class Observer:
    """Sees what a job does: named events (locked, block_start, statistics, propagate, recompute, owl, mid_shard,
    before_rename, publish), phase times, progress bars and log lines. Subclass it to watch a job (the memory
    benchmark tags RSS samples with the phase); pass it as `observer=` to the API."""

    def __init__(self, log=None, progress: bool = True, fault: Fault | None = None):
        self._log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.progress_enabled, self.fault = progress, fault
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def event(self, name: str, detail: str = "") -> None:
        if self.fault is not None:
            self.fault(name, detail)

    @contextmanager
    def phase(self, name: str, device: torch.device | None = None):
        """Time a phase (from any thread); CUDA work is synchronised so it counts where it ran."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def bar(self, iterable=None, **kwargs):
        """A bar on a terminal, plain lines in a log (progress.bar)."""
        return progress.bar(iterable, enabled=self.progress_enabled, **kwargs)

    def log(self, msg: str) -> None:
        self._log(msg)

    def quiet(self) -> None:
        """Ranks other than 0 neither log nor draw bars."""
        self._log, self.progress_enabled = (lambda msg: None), False


class _Signals:
    """SIGINT/SIGTERM set a flag; the job stops at the next safe point. A second SIGINT aborts at once."""

    def __init__(self):
        self.received = self.signum = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received, self.signum = signal.Signals(signum).name, signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


@contextmanager
def collect_new_only():
    """Garbage collection on, over the objects created from now on only. The CLI starts with collection off
    (importing torch and transformers made six full collections, 0.5 s on the SmolLM2 job, and freed nothing);
    a job needs it on (a block's tensors caught in a reference cycle must be freed), and freezing what exists
    keeps the full collections small."""
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        if not was_enabled:
            gc.disable()


class Runtime:
    """Owns what a job changes in its process and restores it on exit: garbage collection (`collect_new_only`),
    the current CUDA device and its memory cap, the process group (when this job created it) and the signal
    handlers. Also the one stop rule: every rank asks `stop_requested()` (a collective) at the same points, so
    all ranks stop together."""

    def __init__(self, device: torch.device, env: ProcessEnv, gpu_limit: int | None = None):
        self.device, self.env, self.gpu_limit = device, env, gpu_limit
        self.signals = _Signals()
        self.dist = Dist()
        self._stopped = False
        self._undo: list = []

    def __enter__(self) -> "Runtime":
        try:
            collection = collect_new_only()
            collection.__enter__()
            self._undo.append(lambda: collection.__exit__(None, None, None))
            if self.device.type == "cuda":
                previous = torch.cuda.current_device()
                torch.cuda.set_device(self.device)
                self._undo.append(lambda: torch.cuda.set_device(previous))
                if self.gpu_limit:
                    total = torch.cuda.get_device_properties(self.device).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, self.gpu_limit / total), self.device)
                    self._undo.append(lambda: torch.cuda.set_per_process_memory_fraction(1.0, self.device))
            self.dist, created = Dist.start(self.device, self.env.world, self.env.dist_timeout)
            if created:
                self._undo.append(self.dist.close)
            self.signals.install()
            self._undo.append(self.signals.restore)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        while self._undo:
            self._undo.pop()()
        return False

    def stop_requested(self) -> bool:
        """Has a stop been asked for on any rank? A collective when data-parallel; once true, stays true."""
        self._stopped = self._stopped or self.dist.any(self.signals.received is not None)
        return self._stopped

    @property
    def signal_pending(self) -> bool:
        """This process got a signal (no collective: only for checks inside a pass of a single process)."""
        return not self.dist.enabled and self.signals.received is not None

    def interrupted(self, what: str, out) -> Interrupted:
        return Interrupted(f"{self.signals.received or 'SIGTERM'}: {what}; continue with `streamprune resume {out}`",
                           self.signals.signum or signal.SIGTERM)
