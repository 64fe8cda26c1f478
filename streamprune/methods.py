"""Pruning methods that improve on Wanda and fit the block-by-block stream (wanda-spec.md, last table).

Pure tensor functions on one linear (or one block's scalars) at a time: no I/O, no model loading, float32
math, deterministic (stable sorts, first-index tie rules). Every rule that is per output row runs in row
chunks (`row_chunk`, 0 = all rows at once) and gives the same result for every chunk size.

Conventions shared with wanda.py: W is [out, in]; a mask is a bool tensor of the same shape, True = zeroed;
`act_sq_mean` is the Wanda statistic s_j = (1/N) * sum over all tokens of x_j^2 (InputStats.scaler);
`Structure()` is unstructured, `Structure(n, m)` zeroes n of every m consecutive inputs.

Contents
- RIA: `ria_score`, `ria_mask`, `ria_channel_permutation`.
- DSnoT: `ChannelMoments` (its statistics), `dsnot_refine`.
- SparseGPT: `HessianStats`, `sparsegpt_prune`.
- OWL: `owl_outlier_ratio`, `owl_sparsities`.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .errors import StreamPruneError
from .wanda import Structure, _row_chunks, _select, check_prunable

_SUM_CHUNK = 1024          # fixed row chunk for column sums, so results never depend on the caller's row_chunk
_PAIR_BUDGET = 1 << 22     # elements per candidate tensor in the channel-permutation refinement


# ----------------------------------------------------------------------------------------------------------
# RIA
# ----------------------------------------------------------------------------------------------------------

def _abs_col_sum(weight: torch.Tensor) -> torch.Tensor:
    """sum_i |W_ij| per input column j, float32, identical for every caller row_chunk."""
    out, inp = weight.shape
    acc = torch.zeros(inp, dtype=torch.float64, device=weight.device)
    for rows in _row_chunks(out, _SUM_CHUNK):
        acc += weight[rows].float().abs().sum(0, dtype=torch.float32).double()
    return acc.float()


def _ria_chunk(w: torch.Tensor, col_sum: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    a = w.float().abs()
    row_sum = a.sum(1, keepdim=True)
    row_sum = torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)   # all-zero row: every term is 0/1
    return (a / col_sum + a / row_sum) * act


def _ria_parts(weight: torch.Tensor, act_sq_mean: torch.Tensor, alpha: float):
    col_sum = _abs_col_sum(weight)
    col_sum = torch.where(col_sum == 0, torch.ones_like(col_sum), col_sum).reshape(1, -1)
    act = torch.sqrt(act_sq_mean.float().reshape(1, -1)) ** alpha
    return col_sum, act


@torch.no_grad()
def ria_score(weight: torch.Tensor, act_sq_mean: torch.Tensor, alpha: float = 0.5,
              row_chunk: int = 0) -> torch.Tensor:
    """The full RIA score matrix [out, in] in float32 (see `ria_mask` for the formula).

    RIA (Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language
    Models", ICLR): score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (sqrt(s_j)) ** alpha, i.e. the
    relative importance of the weight within its input column plus within its output row, times the input
    channel's L2 norm (proportional to sqrt(s_j), s = act_sq_mean) to the power alpha (paper: 0.5). This is
    the reference's expression `(|W|/sum(|W|, dim=0) + |W|/sum(|W|, dim=1)) * sqrt(scaler_row) ** a`; an
    all-zero column or row has its sum replaced by 1 (its entries are 0 anyway; the reference would divide
    0 by 0). Holds one float32 copy of W: use `ria_mask` (row chunks) when only the mask is needed.
    """
    col_sum, act = _ria_parts(weight, act_sq_mean, alpha)
    out = weight.shape[0]
    score = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    for rows in _row_chunks(out, row_chunk):
        score[rows] = _ria_chunk(weight[rows], col_sum, act)
    return score


@torch.no_grad()
def ria_mask(weight: torch.Tensor, act_sq_mean: torch.Tensor, sparsity: float, structure: Structure,
             alpha: float = 0.5, row_chunk: int = 0, permute: bool = False, per_row: bool = True,
             permute_rounds: int = 1):
    """Bool mask (True = zero) of the smallest RIA scores; with `permute=True`, `(mask, perm)`.

    RIA (Zhang et al. 2024, "Plug-and-Play", ICLR), relative importance and activations:
    score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (sqrt(act_sq_mean_j)) ** alpha, computed in
    float32 in row chunks (the column sums are taken once over all rows first). Unstructured (`per_row=True`,
    Wanda's rule, the reference's `--per_outneuron`): per output row a stable ascending sort zeroes the
    k = int(in * sparsity) smallest scores. `per_row=False` is the reference's default instead: one threshold
    per matrix, zero every score <= the (int(out*in*sparsity)+1)-th smallest (needs the whole score matrix).
    N:M: per group of M consecutive inputs the N smallest are zeroed with topk(largest=False), exactly
    wanda._select. `permute=True` (N:M only) first computes `perm = ria_channel_permutation(...)` and selects
    N:M on the column-permuted score `score[:, perm]`; the returned mask is in the ORIGINAL column order, so
    `mask[:, perm]` is N:M but `mask` itself generally is NOT N:M in memory order. That is only useful if the
    caller also applies the permutation to the model (stores `W[:, perm]` and feeds `x[..., perm]`, i.e.
    permutes the producer of this linear's input); the reference's default path zeroes `mask` on the
    unpermuted matrix. Holds the full float32 score when `permute` or `per_row=False`.
    """
    out, inp = weight.shape
    check_prunable(inp, structure)
    if permute and not structure.is_nm:
        raise StreamPruneError("RIA channel permutation only applies to N:M structures")
    mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
    if permute:
        score = ria_score(weight, act_sq_mean, alpha, row_chunk)
        perm = ria_channel_permutation(score, structure.m, structure.n, rounds=permute_rounds)
        for rows in _row_chunks(out, row_chunk):
            chunk = torch.zeros(score[rows].shape, dtype=torch.bool, device=weight.device)
            chunk[:, perm] = _select(score[rows][:, perm], sparsity, structure)
            mask[rows] = chunk
        return mask, perm
    if not structure.is_nm and not per_row:
        score = ria_score(weight, act_sq_mean, alpha, row_chunk)
        k = int(score.numel() * sparsity)
        if k >= score.numel():
            return torch.ones_like(mask)
        thresh = torch.kthvalue(score.flatten(), k + 1).values
        return score <= thresh
    col_sum, act = _ria_parts(weight, act_sq_mean, alpha)
    for rows in _row_chunks(out, row_chunk):
        mask[rows] = _select(_ria_chunk(weight[rows], col_sum, act), sparsity, structure)
    return mask


def _nm_kept_per_group(score: torch.Tensor, perm: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Kept score of each group of `perm` (sum over rows of the m-n largest entries), float32 [groups]."""
    groups = score[:, perm].reshape(score.shape[0], -1, m)
    return torch.topk(groups, m - n, dim=-1).values.sum(-1).sum(0)


def _kept(vals: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(vals, keep, dim=-1).values.sum(-1)


@torch.no_grad()
def ria_channel_permutation(score: torch.Tensor, m: int, n: int | None = None, rounds: int = 1) -> torch.Tensor:
    """Permutation `perm` of the input columns such that N:M on `score[:, perm]` keeps more total score.

    RIA (Zhang et al. 2024, "Plug-and-Play", section "channel permutation"): with N:M, which channels share a
    group of M decides what survives; the objective is the kept score sum over groups g and rows i of the
    M-N largest score[i, perm[gM:(g+1)M]]. Step 1 is the reference's heuristic channel reallocation: sort
    the channels ascending by their column score sum (stable), cut that order into M contiguous chunks of
    in/M channels and give chunk k to slot k of every group (chunks with odd k reversed, a snake), so every
    group gets one channel of every importance level. Step 1 keeps that layout only if it beats the identity
    (the reference keeps it unconditionally). Step 2 replaces the reference's linear-sum-assignment stage by a
    bounded local-swap refinement: `rounds` passes; each pass pairs group g with group g XOR s for
    s = 1, 2, 4, ... (disjoint pairs), evaluates all M*M single-channel exchanges of every pair exactly and
    applies the best one when it raises the pair's kept score (by more than 1e-6 relative, against float
    noise); a pass with no exchange ends early. The kept score therefore never decreases from the better of
    identity and step 1. `n` (zeros per group) defaults to m // 2. Returns a LongTensor: permuted column p
    is original column perm[p]. Cost per pass ~ log2(in/M) * out * in * M^2 float ops.
    """
    out, inp = score.shape
    n = m // 2 if n is None else n
    if not 0 < n < m or inp % m:
        raise StreamPruneError(f"channel permutation needs 0 < n < m and in_features % m == 0 (n={n}, m={m}, in={inp})")
    score = score.float()
    g_count = inp // m
    keep = m - n
    dev = score.device

    order = torch.sort(score.sum(0), stable=True)[1]
    heur = torch.empty_like(order)
    for k in range(m):
        chunk = order[k * g_count:(k + 1) * g_count]
        heur[k::m] = chunk.flip(0) if k % 2 else chunk
    ident = torch.arange(inp, device=dev)
    perm = heur if _nm_kept_per_group(score, heur, m, n).sum() > _nm_kept_per_group(score, ident, m, n).sum() else ident
    perm = perm.clone()

    eye = torch.eye(m, dtype=torch.bool, device=dev)
    a_sel = eye.reshape(1, 1, m, 1, m)     # candidate (i, j): slot c of group A takes B's channel j when c == i
    b_sel = eye.reshape(1, 1, 1, m, m)     # slot c of group B takes A's channel i when c == j
    for _ in range(max(0, rounds)):
        changed = False
        s = 1
        while s < g_count:
            a = torch.arange(g_count, device=dev)
            b = a ^ s
            keep_pair = (b < g_count) & (a < b)
            a, b = a[keep_pair], b[keep_pair]
            chunk_pairs = max(1, _PAIR_BUDGET // max(1, out * m * m * m))
            for p0 in range(0, a.numel(), chunk_pairs):
                pa, pb = a[p0:p0 + chunk_pairs], b[p0:p0 + chunk_pairs]
                grid = perm.view(g_count, m)
                ca, cb = grid[pa], grid[pb]                              # [P, m] column ids
                sa, sb = score[:, ca], score[:, cb]                      # [out, P, m]
                base = (_kept(sa, keep) + _kept(sb, keep)).sum(0)        # [P]
                new_a = torch.where(a_sel, sb[:, :, None, :, None], sa[:, :, None, None, :])
                gain = _kept(new_a, keep).sum(0)
                del new_a
                new_b = torch.where(b_sel, sa[:, :, :, None, None], sb[:, :, None, None, :])
                gain += _kept(new_b, keep).sum(0)
                del new_b
                gain = (gain - base[:, None, None]).reshape(-1, m * m)
                best, idx = gain.max(1)
                do = best > 1e-6 * base.abs().clamp_min(1e-30)
                if do.any():
                    i, j = idx[do] // m, idx[do] % m
                    pos_a, pos_b = pa[do] * m + i, pb[do] * m + j
                    va, vb = perm[pos_a].clone(), perm[pos_b].clone()
                    perm[pos_a], perm[pos_b] = vb, va
                    changed = True
            s *= 2
        if not changed:
            break
    return perm


# ----------------------------------------------------------------------------------------------------------
# DSnoT
# ----------------------------------------------------------------------------------------------------------

class ChannelMoments:
    """Per-channel input moments for DSnoT, accumulated like the reference's WrappedGPT.add_batch.

    Call `add(x)` with each input batch of one linear (x: [b, L, in] or [tokens, in]; or register `hook`).
    `mean`: token mean of x_j. `var`: the reference's variance, the token-weighted running mean of each
    batch's population variance (unbiased=False) -- within-batch variance, not the pooled variance of all
    tokens. `sum_mean`: the reference's `sum_metric_row`, the running mean over samples (same convention as
    InputStats: s *= n/(n+b); n += b; s += sum over the batch's tokens of x / n), i.e. (1/N) * sum over all
    tokens of x_j = L * mean for sequences of L tokens. DSnoT multiplies W by `sum_mean`; passing it as
    `dsnot_refine(act_mean=...)` reproduces the reference's `update_threshold` units exactly.
    """

    def __init__(self, columns: int, device=None):
        self.mean = torch.zeros(columns, dtype=torch.float32, device=device)
        self.var = torch.zeros(columns, dtype=torch.float32, device=device)
        self.sum_mean = torch.zeros(columns, dtype=torch.float32, device=device)
        self.ntokens = 0
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        self.accumulate(*self.contribution(x))

    @staticmethod
    def contribution(x: torch.Tensor):
        """One batch's part: (samples, tokens, mean, variance, sum over tokens); `accumulate` merges it."""
        b = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        return b, x.shape[0], x.mean(0), x.var(0, unbiased=False), x.sum(0)

    def accumulate(self, b: int, t: int, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        if self.ntokens == 0:
            self.mean, self.var = mean, var
        else:
            self.var = (self.var * self.ntokens + var * t) / (self.ntokens + t)
            self.mean = (self.mean * self.ntokens + mean * t) / (self.ntokens + t)
        self.ntokens += t
        self.sum_mean *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        self.sum_mean += total / self.nsamples

    def hook(self, module, args, output) -> None:
        self.add(args[0])


@torch.no_grad()
def dsnot_refine(weight: torch.Tensor, mask: torch.Tensor, act_mean: torch.Tensor, act_var: torch.Tensor,
                 act_sq_mean: torch.Tensor, max_cycles: int = 50, update_threshold: float = 0.1,
                 pow_of_var_regrowing: float = 1.0, structure: Structure = Structure(), row_chunk: int = 0,
                 accept: str = "improve") -> torch.Tensor:
    """Training-free refinement of a pruning mask (True = zeroed); each row keeps its count of zeros.

    DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR),
    following the official lib/prune.py. With D_ij = W_ij * mu_j (mu = act_mean), the expected output error of
    row i is e_i = sum over pruned j of D_ij (= E[(W x - W_masked x)_i]). Per cycle, every active row does at
    most one swap, all rows in parallel: if e > 0 it regrows the pruned weight with the largest
    D_ij / var_j ** pow_of_var_regrowing among those with D_ij > 0 and prunes the kept weight with the
    smallest Wanda score |W_ij| * sqrt(act_sq_mean_j) among those with D_ij < 0 (mirror image for e <= 0),
    so e_new = e - D_regrown + D_pruned. Candidates come from lists fixed at the start (initially pruned,
    resp. initially kept weights, each consumed in order), so a weight changes state at most once. N:M: the
    regrow order is the same, and the pruned weight is the smallest-Wanda initially kept, still kept weight of
    the regrown weight's own group (with the opposite-sign condition in "improve" mode; a group with no such
    weight skips that regrow candidate), so every group keeps N zeros. A row stops for good when
    |e| <= update_threshold, when a list is exhausted, when the swap is rejected, or after max_cycles.
    `accept="improve"` (default) rejects a swap unless |e_new| < |e|, so |e| never grows (the stopping rule
    "until |e| stops improving"). `accept="reference"` is the official acceptance: unstructured accepts
    whenever |e| > threshold (its `--without_same_sign` is argparse type=bool, default True, so always on; e
    may overshoot); N:M additionally requires sign(e_new) == sign(initial e) and picks the group's
    smallest-Wanda kept weight regardless of sign. Units: the reference's mu is `sum_metric_row`
    (= ChannelMoments.sum_mean, L times the token mean), and `update_threshold` (0.1) is in those units.
    var is clamped to >= float32 tiny; pow 0 disables the variance term. Works in row chunks.
    """
    if accept not in ("improve", "reference"):
        raise StreamPruneError(f"dsnot_refine: accept must be 'improve' or 'reference', not {accept!r}")
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
    for rows in _row_chunks(out, row_chunk):
        new[rows] = _dsnot_rows(weight[rows].float(), mask[rows].bool(), mu, root, varp, max_cycles,
                                float(update_threshold), structure, accept == "reference")
    return new


def _ordered(selected: torch.Tensor, key: torch.Tensor, descending: bool):
    """Per row: the selected columns ordered by key (stable), and how many there are."""
    fill = float("-inf") if descending else float("inf")
    order = torch.sort(torch.where(selected, key, torch.full_like(key, fill)), dim=1, descending=descending,
                       stable=True)[1]
    return order, selected.sum(1)


def _dsnot_rows(w, pruned0, mu, root, varp, max_cycles, thr, structure, reference):
    rows, cols = w.shape
    d = w * mu
    wanda = w.abs() * root
    e = torch.where(pruned0, d, torch.zeros_like(d)).sum(1)
    init_sign = torch.sign(e)
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
            if not reference:
                dg = d.gather(1, gcols)
                elig &= torch.where(side[:, None] == 0, dg < 0, dg > 0)
            wg = torch.where(elig, wanda.gather(1, gcols), torch.full_like(wanda[:, :m], float("inf")))
            pi = gcols.gather(1, wg.argmin(1, keepdim=True)).squeeze(1)
            pr_ok = elig.any(1)
        e_new = e - d[ar, ri] + d[ar, pi]
        big = e.abs() > thr
        if reference:
            ok = active & big & rg_ok & pr_ok
            if nm:
                ok &= torch.sign(e_new) == init_sign
            skip = torch.zeros_like(ok)
        else:
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


# ----------------------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------------------

class HessianStats:
    """H = (2/n) * sum over all tokens of x x^T for one linear, float32, the reference's running mean.

    SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML), `SparseGPT.add_batch`: for each batch of b samples (x: [b, L, in]; a 2-D [tokens, in]
    input counts as b = 1), H *= n/(n+b); n += b; X = sqrt(2/n) * x.float() (tokens x in); H += X^T X.
    n counts samples (sequences), not tokens, exactly as wanda.InputStats. Memory: in^2 float32 per linear
    (3.3 GB for a 28672-input down_proj), plus one float32 copy of the batch.
    """

    def __init__(self, columns: int, device=None):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        b = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])
        self.H *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.t().matmul(x)

    def hook(self, module, args, output) -> None:
        self.add(args[0])


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, structure: Structure,
                    blocksize: int = 128, percdamp: float = 0.01, overwrite_H: bool = False):
    """SparseGPT mask selection with OBS weight reconstruction; returns `(new_weight, mask)`.

    SparseGPT (Frantar & Alistarh 2023, ICML), the reference `fasterprune` step by step in float32: columns j
    with H_jj == 0 are dead (H_jj := 1, W[:, j] := 0); H += percdamp * mean(diag H) * I; Hinv = the upper
    Cholesky factor U of H^-1 (cholesky, cholesky_inverse, cholesky upper). Columns are processed in blocks of
    `blocksize`; unstructured, at the start of each block the mask is chosen over the WHOLE block (all rows
    together, not per row) on the current, already updated weights: t = W_blk^2 / diag(U_blk)^2, zero every
    t <= the (int(numel_blk * sparsity) + 1)-th smallest t, i.e. int(numel_blk*sparsity)+1 weights per block
    (more on ties), so the matrix total is sparsity*numel plus about one per block and rows differ. N:M:
    at every column i with i % M == 0 the N smallest w^2/U_jj^2 of each row in columns i..i+M-1 (current
    values; needs blocksize % M == 0). Then per column i: q = w with the masked entries 0,
    err = (w - q) / U_ii, W[:, i:] -= err U[i, i:] inside the block and W[:, end:] -= Err U[blk, end:] after
    it (OBS: the pruned weight's error is compensated on the not yet processed columns). new_weight is
    returned in weight.dtype, zero at every masked entry and on dead columns. Peak memory: W in float32,
    a working copy of H plus one Cholesky factor (skip the copy with overwrite_H=True, which destroys H).
    """
    out, inp = weight.shape
    check_prunable(inp, structure)
    if H.shape != (inp, inp):
        raise StreamPruneError(f"sparsegpt_prune: H is {tuple(H.shape)}, expected ({inp}, {inp})")
    if structure.is_nm and blocksize % structure.m:
        raise StreamPruneError(f"sparsegpt_prune: blocksize {blocksize} is not a multiple of M={structure.m}")
    W = weight.float().clone()
    Hw = H if (overwrite_H and H.dtype == torch.float32) else H.float().clone()
    diag_idx = torch.arange(inp, device=W.device)
    dead = torch.diag(Hw) == 0
    Hw[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(Hw))
    Hw[diag_idx, diag_idx] += damp
    L, info = torch.linalg.cholesky_ex(Hw)
    del Hw
    if int(info):
        raise StreamPruneError("sparsegpt_prune: H + damping is not positive definite; raise percdamp")
    Hinv = torch.cholesky_inverse(L)
    del L
    Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info):
        raise StreamPruneError("sparsegpt_prune: the inverse Hessian is not positive definite; raise percdamp")

    mask = torch.zeros(out, inp, dtype=torch.bool, device=W.device)
    n, m = structure.n, structure.m
    for i1 in range(0, inp, blocksize):
        i2 = min(i1 + blocksize, inp)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if not structure.is_nm:
            tmp = W1 ** 2 / d1.reshape(1, -1) ** 2
            k = int(tmp.numel() * sparsity)
            if k >= tmp.numel():
                mask1 = torch.ones_like(W1, dtype=torch.bool)
            else:
                mask1 = tmp <= torch.kthvalue(tmp.flatten(), k + 1).values
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if structure.is_nm and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d1[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(weight.dtype), mask


# ----------------------------------------------------------------------------------------------------------
# OWL
# ----------------------------------------------------------------------------------------------------------

MetricItem = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]


def _metric_chunks(item, row_chunk: int):
    if isinstance(item, torch.Tensor):
        for rows in _row_chunks(item.shape[0], row_chunk):
            yield item[rows].float()
    else:
        weight, s = item
        root = torch.sqrt(s.float().reshape(1, -1))
        for rows in _row_chunks(weight.shape[0], row_chunk):
            yield weight[rows].float().abs() * root


@torch.no_grad()
def owl_outlier_ratio(metric_list: Sequence[MetricItem], hyper_m: float = 5.0, per_linear: bool = False,
                      row_chunk: int = 0) -> float:
    """Share (a fraction in [0, 1]) of one block's Wanda scores that are outliers: > hyper_m * mean.

    OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs
    to High Sparsity", ICML): the layerwise outlier distribution D_l = #{A_ij > M * mean(A)} / #A with the
    Wanda score A = |W| * sqrt(act_sq_mean) (M = hyper_m = 5 for LLaMA in the paper). Each item of
    `metric_list` is one linear of the block: a precomputed metric tensor, or a (weight, act_sq_mean) pair
    whose metric is computed in row chunks (never materialised whole). The official code (luuyin/OWL,
    lib/prune_all.py) concatenates all linears of the block and calls check_outlier_mean once, so the mean is
    the ONE mean over all of the block's scores (default, per_linear=False); per_linear=True compares each
    linear with its own mean instead. Sums are accumulated in float64 (chunk-invariant). The official value is
    in percent (x100); that factor cancels in `owl_sparsities`. Two passes over the metric.
    """
    sums, sizes = [], []
    for item in metric_list:
        total = torch.zeros((), dtype=torch.float64)
        size = 0
        for chunk in _metric_chunks(item, row_chunk):
            total += chunk.sum(dtype=torch.float64).cpu()
            size += chunk.numel()
        sums.append(float(total))
        sizes.append(size)
    all_size = sum(sizes)
    if all_size == 0:
        return 0.0
    block_mean = sum(sums) / all_size
    count = 0
    for item, s, size in zip(metric_list, sums, sizes):
        thresh = hyper_m * ((s / size) if per_linear else block_mean)
        for chunk in _metric_chunks(item, row_chunk):
            count += int((chunk > thresh).sum())
    return count / all_size


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
