"""The computation on one block: the dense statistics pass, the pruner on every linear, the propagation pass.

Nothing here reads or writes files or job state; the block arrives with its weights and leaves pruned, and its
outputs (the next block's inputs) are in the activation store. Statistics come from the still dense block, for
every linear from the same pass; the propagation runs the pruned block on the same inputs (wanda-spec.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .memory import trim
from .errors import StreamPruneError
from .model import all_finite, block_output
from .statistics import BlockStatistics, StopForward


TRIM_ELEMENTS = 1 << 20  # a malloc_trim costs about 1 ms: worth it after a workspace of several MB, per linear


class Stopped(Exception):
    """A stop was requested in the middle of a pass: the block is abandoned (it is not committed)."""


@dataclass
class BlockResult:
    linears: dict         # linear name -> {"zeros", "numel"}
    target: float         # the sparsity this block was pruned to
    masks: dict           # local weight name -> mask, for the weights asked for
    recomputed: set       # local weight names the pruner replaced (not only masked)

    @property
    def sparsity(self) -> float:
        zeros = sum(v["zeros"] for v in self.linears.values())
        numel = sum(v["numel"] for v in self.linears.values())
        return zeros / numel if numel else 0.0


class BlockLoop:
    def __init__(self, pruner, structure, runtime, observer, device: torch.device, dtype: torch.dtype,
                 row_chunk: int = 0):
        self.pruner, self.structure, self.rt, self.obs = pruner, structure, runtime, observer
        self.device, self.dtype, self.row_chunk = device, dtype, row_chunk

    @torch.no_grad()
    def forward_all(self, block: nn.Module, i: int, acts, desc: str, outputs: bool = True,
                    stats: BlockStatistics | None = None) -> None:
        """Run this rank's calibration batches through `block` (outputs into `acts.outputs` if asked)."""
        if self.rt.stop_requested():
            raise Stopped
        for j0, j1 in self.obs.bar(acts.batches, desc=f"block {i} {desc}", leave=False):
            if self.rt.signal_pending:
                raise Stopped
            self.obs.event(desc)
            a, b = acts.local(j0, j1)
            try:
                y = block_output(block, acts.inputs.read(a, b, self.device), acts.kwargs[j1 - j0][i])
            except StopForward:
                continue
            if stats is not None:
                stats.forward_done()
            if outputs:
                if not all_finite(y):
                    raise StreamPruneError(f"block {i}: its outputs are not finite (NaN or Inf) in "
                                           f"{str(self.dtype).replace('torch.', '')} compute"
                                           + ("; rerun with --dtype float32" if self.dtype != torch.float32 else ""))
                acts.outputs.write(a, y)

    def statistics(self, block: nn.Module, i: int, acts, needs: frozenset, desc: str,
                   outputs: bool) -> BlockStatistics:
        """A dense pass with statistics hooks (stopping after the last linear unless outputs are wanted)."""
        with BlockStatistics(block, needs, record=self.rt.dist.enabled, stop_early=not outputs) as stats:
            self.forward_all(block, i, acts, desc, outputs=outputs, stats=stats)
        if self.rt.dist.enabled:
            stats.reduce(self.rt.dist)
        return stats

    @torch.no_grad()
    def prune_block(self, i: int, block: nn.Module, acts, sparsity: float, want_masks: set) -> BlockResult:
        """Prune every linear of block i in place; `want_masks` names the weights whose masks to return."""
        stats = None
        if self.pruner.needs_data:
            with self.obs.phase("statistics", self.device):
                stats = self.statistics(block, i, acts, self.pruner.needs, "statistics", outputs=False)
            for name, st in stats.unique().items():
                if not st.finite():
                    raise StreamPruneError(f"block {i} {name}: its inputs are not finite (NaN or Inf) in "
                                           f"{str(self.dtype).replace('torch.', '')} compute; "
                                           + ("rerun with --dtype float32" if self.dtype != torch.float32 else
                                              "the blocks before it produce them"))
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        result = BlockResult({}, sparsity, {}, set())
        with self.obs.phase("prune", self.device):
            for name, lin in linears.items():
                pruned = self.pruner.prune(lin.weight, stats.pop(name) if stats else None, sparsity,
                                           self.structure, self.row_chunk)
                if pruned.weight is not None:
                    lin.weight.copy_(pruned.weight)
                    result.recomputed.add(name + ".weight")
                lin.weight.masked_fill_(pruned.mask, 0)
                result.linears[name] = {"zeros": int(pruned.mask.count_nonzero()), "numel": pruned.mask.numel()}
                if name + ".weight" in want_masks:
                    result.masks[name + ".weight"] = pruned.mask
                del pruned
                if lin.weight.numel() >= TRIM_ELEMENTS:
                    trim()  # its metric and selection workspace went back to malloc: give the pages to the OS
        del stats
        if self.pruner.needs_data:
            with self.obs.phase("propagate", self.device):
                self.forward_all(block, i, acts, "propagate")
        return result

    def sweep(self, model, acts, profile) -> list[float]:
        """A sweeping profile's dense pass over every block: each block's score, from its dense statistics,
        its outputs the next block's inputs (nothing is pruned)."""
        scores = []
        for i in self.obs.bar(range(len(model.blocks)), desc=f"{profile.name} sweep", unit="block"):
            block, _ = model.load_block(i)
            stats = self.statistics(block, i, acts, profile.needs, profile.name, outputs=True)
            scores.append(profile.score([(m.weight, stats.stats[n]) for n, m in stats.linears.items()], self.row_chunk))
            del stats
            model.release_block(i)
            acts.swap()
        return scores
