"""Magnitude, the baseline without calibration data: one |W| threshold per matrix (zero everything <= the
(k+1)-th smallest, as the reference does), or the N smallest |W| of every M consecutive inputs."""

from __future__ import annotations

from .base import Method, Pruned, check_prunable, scaled_abs_mask


class Magnitude(Method):
    name = "magnitude"
    summary = "one |W| threshold per matrix, no calibration"
    needs = frozenset()

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        import torch
        if structure.is_nm:
            return Pruned(scaled_abs_mask(weight, None, sparsity, structure, row_chunk))
        check_prunable(weight.shape[1], structure)
        k = int(weight.numel() * sparsity)
        a = weight.float().abs()
        thresh = torch.kthvalue(a.flatten(), k + 1).values if k < weight.numel() else float("inf")
        return Pruned(a <= thresh)
