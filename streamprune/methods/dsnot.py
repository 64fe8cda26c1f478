"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR).

A refinement of a Wanda or RIA mask, following the official lib/prune.py: with D_ij = W_ij * mu_j (mu =
`moments.sum_mean`), the expected output error of row i is e_i = sum over pruned j of D_ij. Per cycle, every
active row does at most one swap, all rows in parallel: if e > 0 it regrows the pruned weight with the largest
D_ij / var_j ** pow_of_var_regrowing among those with D_ij > 0 and prunes the kept weight with the smallest
Wanda score |W_ij| * sqrt(s_j) among those with D_ij < 0 (mirror image for e <= 0), so e_new = e - D_regrown +
D_pruned. Candidates come from lists fixed at the start (initially pruned, resp. initially kept weights, each
consumed in order), so a weight changes state at most once. N:M: the regrow order is the same, and the pruned
weight is the smallest-Wanda initially kept, still kept weight of the regrown weight's own group with the
opposite sign (a group with none skips that regrow candidate), so every group keeps N zeros. A swap is accepted
only if |e_new| < |e|, so |e| never grows (the official acceptance may overshoot; that mode is not offered). A row
stops for good when |e| <= update_threshold, when a list is exhausted, when a swap is rejected, or after
max_cycles. Units: the reference's mu is `sum_metric_row` (= sum_mean, L times the token mean) and
`update_threshold` (0.1) is in those units. var is clamped to >= float32 tiny; pow 0 disables the variance term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StreamPruneError
from .base import BYTES_PER_METRIC_ELEMENT, Refinement, Structure, Work, check_prunable, row_chunks, no_grad

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch


# bytes per element of a row chunk while refining (W and D, the Wanda score and the regrow key in float32, four
# int64 orderings, the sorts' temporaries): measured 51-53 on 3072 x 3072 and 4096 x 11008 (tests/test_plan.py),
# against the 15 of a plain selection that the plan's row chunk is sized for; the chunk is scaled by 15/56
BYTES_PER_ELEMENT = 56
MEASURED_BYTES_PER_ELEMENT = 68  # what the plan counts: inside the suite the 4096 x 11008 case measured 64


class DSnoT(Refinement):
    name = "dsnot"
    needs = frozenset({"sq_norm", "moments"})

    def refine_work(self, out, inp, structure) -> Work:
        """Four sorts of the candidate lists (counted as selections) and about thirty small operations in each
        of dsnot_refine's 50 cycles."""
        return Work(selections=4 * out * inp, steps=30 * 50)

    def workspace_bytes(self, out, inp, itemsize, row_chunk) -> int:
        """One row chunk's buffers, beside the method's mask and the refined one."""
        return min(out, self._chunk(row_chunk) or out) * inp * MEASURED_BYTES_PER_ELEMENT + 2 * out * inp

    @staticmethod
    def _chunk(row_chunk: int) -> int:
        return max(1, row_chunk * BYTES_PER_METRIC_ELEMENT // BYTES_PER_ELEMENT) if row_chunk else 0

    def refine(self, weight, mask, stats, structure, row_chunk):
        return dsnot_refine(weight, mask, stats.moments.sum_mean, stats.moments.var, stats.sq_norm,
                            structure=structure, row_chunk=self._chunk(row_chunk))


@no_grad
def dsnot_refine(weight: torch.Tensor, mask: torch.Tensor, act_mean: torch.Tensor, act_var: torch.Tensor,
                 act_sq_mean: torch.Tensor, max_cycles: int = 50, update_threshold: float = 0.1,
                 pow_of_var_regrowing: float = 1.0, structure: Structure = Structure(),
                 row_chunk: int = 0) -> torch.Tensor:
    """The refined mask (True = zeroed); every row keeps its count of zeros (see the module docstring)."""
    import torch
    out, inp = weight.shape
    if mask.shape != weight.shape:
        raise StreamPruneError(f"dsnot_refine: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    check_prunable(inp, structure)
    mu = act_mean.float().reshape(1, -1)
    root = torch.sqrt(act_sq_mean.float().reshape(1, -1))
    varp = None
    if pow_of_var_regrowing:
        varp = act_var.float().clamp_min(torch.finfo(torch.float32).tiny).pow(pow_of_var_regrowing).reshape(1, -1)
    new = torch.empty_like(mask, dtype=torch.bool)
    for rows in row_chunks(out, row_chunk):
        new[rows] = _dsnot_rows(weight[rows].float(), mask[rows].bool(), mu, root, varp, max_cycles,
                                float(update_threshold), structure)
    return new


def _ordered(selected: torch.Tensor, key: torch.Tensor, descending: bool):
    """Per row: the selected columns ordered by key (stable), and how many there are."""
    import torch
    fill = float("-inf") if descending else float("inf")
    order = torch.sort(torch.where(selected, key, torch.full_like(key, fill)), dim=1, descending=descending,
                       stable=True)[1]
    return order, selected.sum(1)


def _dsnot_rows(w, pruned0, mu, root, varp, max_cycles, thr, structure):
    import torch
    rows, cols = w.shape
    d = w * mu
    wanda = w.abs() * root
    e = torch.where(pruned0, d, torch.zeros_like(d)).sum(1)
    key = d / varp if varp is not None else d
    # regrow lists: pruned weights with D > 0, largest key first; with D < 0, most negative key first
    rg = [_ordered(pruned0 & (d > 0), key, True), _ordered(pruned0 & (d < 0), key, False)]
    nm = structure.is_nm
    if not nm:
        kept0 = ~pruned0
        # prune lists: kept weights with D < 0 (used when e > 0), with D > 0 (e <= 0); smallest Wanda first
        pr = [_ordered(kept0 & (d < 0), wanda, False), _ordered(kept0 & (d > 0), wanda, False)]
    else:
        m = structure.m
        offs = torch.arange(m, device=w.device).reshape(1, -1)
    ptr_rg = torch.zeros(rows, 2, dtype=torch.long, device=w.device)
    ptr_pr = torch.zeros(rows, 2, dtype=torch.long, device=w.device)
    cur = pruned0.clone()
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    ar = torch.arange(rows, device=w.device)

    def pick(lists, ptr, side):
        """Column at the pointer of list `side` (0/1 per row), and whether the list still has one."""
        p = ptr.gather(1, side[:, None]).squeeze(1)
        n_avail = torch.where(side == 0, lists[0][1], lists[1][1])
        pc = p.clamp(max=cols - 1)[:, None]
        col = torch.where(side == 0, lists[0][0].gather(1, pc).squeeze(1), lists[1][0].gather(1, pc).squeeze(1))
        return col, p < n_avail

    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        side = (e <= 0).long()             # 0: e > 0 (regrow D > 0, prune D < 0); 1: e <= 0 (mirror)
        ri, rg_ok = pick(rg, ptr_rg, side)
        if not nm:
            pi, pr_ok = pick(pr, ptr_pr, side)
        else:
            gcols = (ri - ri % m)[:, None] + offs
            elig = ~cur.gather(1, gcols) & ~pruned0.gather(1, gcols)
            dg = d.gather(1, gcols)
            elig &= torch.where(side[:, None] == 0, dg < 0, dg > 0)
            wg = torch.where(elig, wanda.gather(1, gcols), torch.full_like(wanda[:, :m], float("inf")))
            pi = gcols.gather(1, wg.argmin(1, keepdim=True)).squeeze(1)
            pr_ok = elig.any(1)
        e_new = e - d[ar, ri] + d[ar, pi]
        big = e.abs() > thr
        ok = active & big & rg_ok & pr_ok & (e_new.abs() < e.abs())
        skip = active & big & rg_ok & ~pr_ok if nm else torch.zeros_like(ok)
        active = ok | skip
        if bool(ok.any()):
            idx = ar[ok]
            cur[idx, ri[ok]] = False
            cur[idx, pi[ok]] = True
        e = torch.where(ok, e_new, e)
        ptr_rg.scatter_add_(1, side[:, None], (ok | skip).long()[:, None])
        if not nm:
            ptr_pr.scatter_add_(1, side[:, None], ok.long()[:, None])
    return cur
