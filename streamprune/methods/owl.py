"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to
High Sparsity", ICML): blocks with a larger share of outlier Wanda scores are pruned less, the average unchanged.

A dense sweep scores every block before pruning starts: the share of the block's Wanda scores |W| * sqrt(s) that
exceed M times their mean, the ONE mean over all of the block's linears, as the official code (luuyin/OWL,
lib/prune_all.py) concatenates them. The allocation is the official `prune_wanda_outlier` rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import StreamPruneError
from ..choices import PLAN, PRUNE, Option
from .base import Profile, row_chunks, no_grad

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch


class OWL(Profile):
    name = "owl"
    needs = frozenset({"sq_norm"})
    sweeps = True
    options = (Option("owl_lambda", 0.08, "owl: sparsity spread +-lambda.", float, output=True, group="owl",
                      commands=(PRUNE, PLAN), param="lam"),
               Option("owl_m", 5.0, "owl: outlier = score > M x mean.", float, output=True, group="owl",
                      commands=(PRUNE, PLAN), param="hyper_m"))

    def __init__(self, lam: float = 0.08, hyper_m: float = 5.0):
        self.lam, self.hyper_m = lam, hyper_m

    def check(self, sparsity, structure, method) -> None:
        if structure.is_nm:
            raise StreamPruneError(f"--sparsity-profile {self.name} varies unstructured sparsity per block; it does "
                                   "not apply to N:M")
        if not method.needs:
            raise StreamPruneError(f"--sparsity-profile {self.name} needs calibration statistics; use it with "
                                   "wanda, ria, sparsegpt or admm")
        if not 0 <= self.lam < min(sparsity, 1 - sparsity):
            raise StreamPruneError(f"--owl-lambda {self.lam}: must be in [0, {min(sparsity, 1 - sparsity)}) "
                                   f"so every block's sparsity stays in (0, 1)")

    def score(self, linears, row_chunk) -> float:
        return owl_outlier_ratio([(w, st.sq_norm) for w, st in linears], self.hyper_m, row_chunk)

    def allocate(self, scores, target) -> list[float]:
        return owl_sparsities(scores, target, self.lam)


class OWLLinear(OWL):
    """OWL's per-block allocation, then the same rule once more inside every block: each linear's sparsity
    spread by its own outlier share (its scores above M times its own mean) over 2 lambda around the block's,
    most outliers least pruned, the block's parameter-weighted sparsity unchanged (`spread_weighted`)."""
    name = "owl-linear"
    within_needs = frozenset({"sq_norm"})

    def within(self, target, linears, row_chunk) -> list[float]:
        ratios = [owl_outlier_ratio([(w, st.sq_norm)], self.hyper_m, row_chunk) for w, st in linears]
        return spread_weighted(ratios, [w.numel() for w, _ in linears], target, self.lam)


def spread_weighted(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """OWL's allocation with each unit weighted by its size: density (r - min r) / (max r - min r) * 2 lam,
    shifted so that sum(size * sparsity) / sum(size) = target; clamped into [0.01, 0.99] as `owl_sparsities`.
    All ratios equal -> every unit gets `target`."""
    r = [float(x) for x in ratios]
    lo, hi = min(r), max(r)
    if hi == lo:
        return [target] * len(r)
    dens = [(x - lo) / (hi - lo) * 2 * lam for x in r]
    mean = sum(d * n for d, n in zip(dens, sizes)) / sum(sizes)
    return [min(0.99, max(0.01, target + mean - d)) for d in dens]


def _wanda_chunks(weight: torch.Tensor, s: torch.Tensor, row_chunk: int):
    import torch
    root = torch.sqrt(s.float().reshape(1, -1))
    for rows in row_chunks(weight.shape[0], row_chunk):
        yield weight[rows].float().abs() * root


@no_grad
def owl_outlier_ratio(pairs, hyper_m: float = 5.0, row_chunk: int = 0) -> float:
    """Share in [0, 1] of one block's Wanda scores (from [(weight, s)] of its linears) above hyper_m * their mean.

    Sums are accumulated in float64 (chunk-invariant); two passes over the metric, never materialised whole.
    The official value is in percent; that factor cancels in `owl_sparsities`."""
    import torch
    sums, size = [], 0
    for weight, s in pairs:
        total = torch.zeros((), dtype=torch.float64)
        for chunk in _wanda_chunks(weight, s, row_chunk):
            total += chunk.sum(dtype=torch.float64).cpu()
            size += chunk.numel()
        sums.append(float(total))
    if size == 0:
        return 0.0
    thresh = hyper_m * (sum(sums) / size)
    count = 0
    for weight, s in pairs:
        for chunk in _wanda_chunks(weight, s, row_chunk):
            count += int((chunk > thresh).sum())
    return count / size


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios; their mean is `target` (before clamping).

    OWL (Yin et al. 2024, ICML), the official allocation (luuyin/OWL, prune_wanda_outlier): with r the
    per-block outlier ratios, density = (r - min r) * (1 / (max r - min r) * lam * 2), then
    density = density - mean(density) + (1 - target), and sparsity = 1 - density. So the sparsities span
    exactly 2*lam (max - min; the paper's [S - lam, S + lam] band when ratios are symmetric), the most
    outlier-heavy block gets the lowest sparsity, and the mean is exactly `target` in exact arithmetic
    (float64 here). All ratios equal (max == min; the official code would divide by zero) -> every block gets
    `target`. Clamp: a sparsity <= 0 becomes 0.01 (the official rule) and one >= 1 becomes 0.99 (ours), so
    results lie in (0, 1); clamping only happens when target is within 2*lam of 0 or 1, and then the mean
    is no longer exactly target.
    """
    r = [float(x) for x in ratios]
    if not r:
        return []
    lo, hi = min(r), max(r)
    if hi == lo:
        dens = [1.0 - target] * len(r)
    else:
        dens = [(x - lo) * (1 / (hi - lo) * lam * 2) for x in r]
        mean = sum(dens) / len(dens)
        dens = [x - mean + (1 - target) for x in dens]
    out = []
    for x in dens:
        s = 1 - x
        if s <= 0:
            s = 0.01
        elif s >= 1:
            s = 0.99
        out.append(s)
    return out
