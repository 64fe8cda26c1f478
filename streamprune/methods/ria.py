"""RIA (Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models").

score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * sqrt(s_j) ** alpha (alpha = 0.5): a weight's
relative importance within its input column plus within its output row, times the input channel's norm to the
power alpha. Selection per output row (the reference's `--per_outneuron`) or N:M, exactly as Wanda's. An
all-zero column or row has its sum replaced by 1 (its entries are 0 anyway; the reference would divide 0 by 0).
Column sums are taken once over all rows, in fixed chunks, so the score never depends on the caller's chunking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, Pruned, check_prunable, row_chunks, select

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch

SUM_CHUNK = 1024  # fixed row chunk for the column sums


def column_abs_sum(weight: torch.Tensor) -> torch.Tensor:
    """sum_i |W_ij| per input column j, float32, the same for every caller row_chunk."""
    import torch
    out, inp = weight.shape
    acc = torch.zeros(inp, dtype=torch.float64, device=weight.device)
    for rows in row_chunks(out, SUM_CHUNK):
        acc += weight[rows].float().abs().sum(0, dtype=torch.float32).double()
    return acc.float()


def ria_rows(w: torch.Tensor, col_sum: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    import torch
    a = w.float().abs()
    row_sum = a.sum(1, keepdim=True)
    row_sum = torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    return (a / col_sum + a / row_sum) * act


BYTES_PER_ELEMENT = 17  # of a row chunk: the score's float32 temporaries beside the selection's (measured 16.1)


class RIA(Method):
    name = "ria"
    summary = "relative importance and activations"
    needs = frozenset({"sq_norm"})
    refinable = True
    alpha = 0.5

    def workspace_bytes(self, out, inp, itemsize, row_chunk) -> int:
        return min(out, row_chunk or out) * inp * BYTES_PER_ELEMENT + out * inp

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        import torch
        out, inp = weight.shape
        check_prunable(inp, structure)
        col_sum = column_abs_sum(weight)
        col_sum = torch.where(col_sum == 0, torch.ones_like(col_sum), col_sum).reshape(1, -1)
        act = torch.sqrt(stats.sq_norm.float().reshape(1, -1)) ** self.alpha
        mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
        for rows in row_chunks(out, row_chunk):
            mask[rows] = select(ria_rows(weight[rows], col_sum, act), sparsity, structure)
        return Pruned(mask)
