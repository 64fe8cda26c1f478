"""Wanda (Sun et al. 2023): zero the smallest |W_ij| * sqrt(s_j) per output row, s_j = mean over sequences of
the squared input norm of channel j (statistics.SquaredNorms). Selection and tie rule: methods/base.py;
held against tests/reference.py."""

from __future__ import annotations

from .base import Method, Pruned, scaled_abs_mask


class Wanda(Method):
    name = "wanda"
    summary = "|W| x input norm per output row, no weight update"
    needs = frozenset({"sq_norm"})
    refinable = True

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        return Pruned(scaled_abs_mask(weight, stats.sq_norm.float().sqrt(), sparsity, structure, row_chunk))
