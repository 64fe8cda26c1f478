"""What every pruning method shares: the N:M structure, the exact mask selection, and the three small protocols.

Conventions: W is [out, in]; a mask is a bool tensor of W's shape, True = zeroed. Every rule that is per output
row runs in row chunks (`row_chunk`, 0 = all rows at once) and gives the same result for every chunk size: the
chunk only bounds the transient memory of the metric and the selection.

- `Method`: weight + the input statistics it declares in `needs` -> a mask, and maybe a new weight.
- `Refinement`: changes a method's mask (same count of zeros per row or per N:M group).
- `Profile`: how sparse each block is; `sweeps` means it scores every dense block before pruning starts.
Statistics names (what `needs` may hold) are the attributes of `statistics.LinearStats`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..choices import Structure  # noqa: F401 - defined without torch, for the CLI
from ..errors import StreamPruneError

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch

# the selection of one row chunk (`select`): the float32 metric, topk's values and int64 indices for up to a whole
# row, one comparison; measured 14.2 bytes per element at 50% on a 4096 x 11008 matrix (mask included), rounded
# up (17 before overstated a 1536 x 6144 prune's peak by 15%: tests/test_plan.py)
BYTES_PER_METRIC_ELEMENT = 15


def no_grad(fn):
    """torch.no_grad() as a decorator that imports torch when called: the methods import without torch, so the CLI
    reads their names and options (and refuses a bad one) before torch is loaded."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


def check_prunable(in_features: int, structure: Structure) -> None:
    if structure.is_nm and in_features % structure.m:
        raise StreamPruneError(f"--structure {structure}: a linear has in_features {in_features}, "
                               f"not divisible by M={structure.m}")


def row_chunks(rows: int, chunk: int):
    chunk = max(1, chunk or rows)
    for r in range(0, rows, chunk):
        yield slice(r, min(rows, r + chunk))


def select(metric: torch.Tensor, sparsity: float, structure: Structure) -> torch.Tensor:
    """The entries to zero: per row the k = int(in * sparsity) smallest (ties: the lower index first, i.e. a
    stable ascending sort), or per group of M consecutive inputs the N smallest (topk, largest=False).

    Unstructured selection finds each row's k-th smallest value with an unsorted topk and keeps every entry
    below it; only rows where entries equal to that value are more than needed take them in index order. Same
    set as the stable sort (tested), about 3x faster on a CPU."""
    import torch
    rows, inp = metric.shape
    if structure.is_nm:
        mask = torch.zeros_like(metric, dtype=torch.bool)
        groups = metric.reshape(rows, inp // structure.m, structure.m)
        idx = torch.topk(groups, structure.n, dim=-1, largest=False)[1]
        mask.view(rows, inp // structure.m, structure.m).scatter_(2, idx, True)
        return mask
    k = int(inp * sparsity)
    if k == 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    kth = torch.topk(metric, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    mask = metric <= kth
    over = mask.sum(1) > k
    if bool(over.any()):
        r = over.nonzero().squeeze(1)
        sub, t = metric[r], kth[r]
        below, tied = sub < t, sub == t
        need = k - below.sum(1, keepdim=True)
        mask[r] = below | (tied & (tied.cumsum(1) <= need))
    return mask


def scaled_abs_mask(weight: torch.Tensor, column_scale: torch.Tensor | None, sparsity: float,
                    structure: Structure, row_chunk: int = 0) -> torch.Tensor:
    """`select` on |W| (times a per-input-column scale), computed in float32 one row chunk at a time."""
    import torch
    out, inp = weight.shape
    check_prunable(inp, structure)
    mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
    scale = None if column_scale is None else column_scale.float().reshape(1, -1)
    for rows in row_chunks(out, row_chunk):
        metric = weight[rows].float().abs()
        if scale is not None:
            metric = metric * scale
        mask[rows] = select(metric, sparsity, structure)
    return mask


@dataclass(frozen=True)
class Work:
    """What pruning (or a forward) costs, counted for the time estimate (timing.py): matmul FLOPs, metric
    elements through a selection, small tensor operations (each a fixed dispatch cost) and elements through
    elementwise operations."""
    flops: float = 0
    selections: float = 0
    steps: float = 0
    elements: float = 0  # elements through elementwise ops (memory-bound)

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.selections + other.selections, self.steps + other.steps,
                    self.elements + other.elements)


class Pruned(NamedTuple):
    mask: torch.Tensor
    weight: torch.Tensor | None = None  # a new weight (already zero where masked), when the method updates it


class Method:
    """Prunes one weight matrix from the statistics it declares."""
    name = ""
    needs: frozenset = frozenset({"sq_norm"})
    refinable = False        # a Refinement may change its mask
    updates_weights = False  # returns a new weight, not only a mask
    options: tuple = ()      # its own options (options.Option), passed to its constructor by their `param`
    summary = ""             # one line for --help and docs/options.md

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    def workspace_bytes(self, out: int, inp: int, itemsize: int, row_chunk: int) -> int:
        """Peak transient bytes of pruning one [out, inp] matrix beyond its statistics (the memory plan's
        figure): the selection of one row chunk and the bool mask."""
        return min(out, row_chunk or out) * inp * BYTES_PER_METRIC_ELEMENT + out * inp

    def prune_work(self, out: int, inp: int, structure: Structure, sparsity: float) -> Work:
        """The cost of pruning one [out, inp] matrix (the time estimate's figure): one selection over it."""
        return Work(selections=out * inp, steps=20)

    def prune(self, weight: torch.Tensor, stats, sparsity: float, structure: Structure, row_chunk: int) -> Pruned:
        raise NotImplementedError


class Refinement:
    """Changes a method's mask, keeping every row's (or N:M group's) count of zeros."""
    name = ""
    needs: frozenset = frozenset()
    options: tuple = ()

    def workspace_bytes(self, out: int, inp: int, itemsize: int, row_chunk: int) -> int:
        """Peak transient bytes of refining one [out, inp] mask (after the method's workspace is freed)."""
        return 0

    def refine_work(self, out: int, inp: int, structure: Structure) -> Work:
        """The cost of refining one [out, inp] mask (the time estimate's figure)."""
        return Work()

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats, structure: Structure,
               row_chunk: int) -> torch.Tensor:
        raise NotImplementedError


class Profile:
    """How sparse each block is. A profile that `sweeps` scores every dense block first (one extra forward).
    One that allocates `within` a block too gets, before its linears are pruned, the block's statistics (of
    the names in `within_needs`, gathered beside the method's) and returns each linear's sparsity."""
    name = ""
    needs: frozenset = frozenset()
    within_needs: frozenset = frozenset()
    sweeps = False
    options: tuple = ()

    def within(self, target: float, linears: list, row_chunk: int) -> list[float] | None:
        """Each of [(weight, LinearStats)]'s sparsity inside a block pruned to `target`; None: all `target`."""
        return None

    def check(self, sparsity: float, structure: Structure, method: Method) -> None:
        pass

    def score(self, linears: list, row_chunk: int) -> float:
        """One dense block's score from [(weight, LinearStats)] of its linears."""
        raise NotImplementedError

    def allocate(self, scores: list[float], target: float) -> list[float]:
        raise NotImplementedError


class Uniform(Profile):
    name = "uniform"


@dataclass(frozen=True)
class Pruner:
    """A method, optionally followed by a refinement: what the block loop calls for every linear."""
    method: Method
    refinement: Refinement | None = None

    @property
    def needs(self) -> frozenset:
        return self.method.needs | (self.refinement.needs if self.refinement else frozenset())

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    @property
    def updates_weights(self) -> bool:
        return self.method.updates_weights

    def workspace_bytes(self, out: int, inp: int, itemsize: int, row_chunk: int) -> int:
        refined = self.refinement.workspace_bytes(out, inp, itemsize, row_chunk) if self.refinement else 0
        return max(self.method.workspace_bytes(out, inp, itemsize, row_chunk), refined)

    def prune_work(self, out: int, inp: int, structure: Structure, sparsity: float) -> Work:
        work = self.method.prune_work(out, inp, structure, sparsity)
        return work + self.refinement.refine_work(out, inp, structure) if self.refinement else work

    def prune(self, weight: torch.Tensor, stats, sparsity: float, structure: Structure, row_chunk: int) -> Pruned:
        result = self.method.prune(weight, stats, sparsity, structure, row_chunk)
        if self.refinement is None:
            return result
        w = weight if result.weight is None else result.weight
        return Pruned(self.refinement.refine(w, result.mask, stats, structure, row_chunk), result.weight)
