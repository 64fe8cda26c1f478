"""Data-parallel pruning over torch.distributed (launched by torchrun: NCCL on GPUs, gloo on CPU).

Every rank streams the same block and runs its contiguous share of the calibration batches. Per-channel
statistics are not summed across ranks but gathered per batch and replayed in the global batch order, so the
float32 running mean is bit-for-bit the single-process one and the masks are identical. Hessians (SparseGPT)
are too large to gather per batch; they are summed, which changes the float32 rounding slightly. One rank
(rank 0) writes the output and the job state. Every collective has a timeout, so a dead rank fails the job.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as tdist

from .errors import PeerFailed, StreamPruneError


class Dist:
    """This process's place in the job; a single process is world 1 and every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, group=None):
        self.rank, self.world, self.group = rank, world, group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device, world: int, timeout_s: float) -> tuple["Dist", bool]:
        """This process's Dist under torchrun (world > 1), creating the process group unless one exists.
        Returns (dist, whether this call created the group)."""
        if world <= 1:
            return cls(), False
        created = False
        if not tdist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            except Exception as e:  # noqa: BLE001 - any rendezvous failure is the user's one line
                raise StreamPruneError(f"torch.distributed initialisation failed ({backend}): {e}") from None
            created = True
        return cls(tdist.get_rank(), tdist.get_world_size()), created

    def share(self, batches: list) -> list:
        """This rank's contiguous share of the global batch list (whole batches, in order)."""
        n = len(batches)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return batches[lo:hi]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (CPU tensors inside are fine)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        self._collective(tdist.all_gather_object, out, obj)
        return out

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        return any(self.gather(bool(flag)))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self._collective(tdist.all_reduce, tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            self._collective(tdist.barrier)

    def agree(self, fn):
        """Run `fn` on rank 0 and give its result (or its StreamPruneError) to every rank."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except StreamPruneError as e:
                error = e
        if self.enabled:
            result, error = self.gather((result, str(error) if error else None))[0]
            if error and not self.main:
                error = StreamPruneError(error)
        if error:
            raise error
        return result

    def _collective(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            raise PeerFailed(f"rank {self.rank}: a collective with the other ranks failed or timed out "
                                   f"(did a rank die?): {str(e).splitlines()[0][:200]}") from None

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
