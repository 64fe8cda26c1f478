"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
a mask per block of 128 columns and the OBS weight update, from the Hessian H = (2/n) sum x x^T of the linear's
input (statistics.HessianStats). Memory: in^2 float32 per linear while it is pruned."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StreamPruneError
from .base import Method, Pruned, Structure, Work, check_prunable, no_grad

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch


FACTORIZATION = 2.25  # in x in float32 matrices live at once while H is factorized and inverted (measured)
UPDATE_BYTES = 11     # per entry of W while its columns are updated (module docstring of workspace_bytes)


class SparseGPT(Method):
    name = "sparsegpt"
    summary = "mask and weight update from the Hessian"
    needs = frozenset({"hessian"})
    updates_weights = True

    def workspace_bytes(self, out, inp, itemsize, row_chunk) -> int:
        """Measured (tests/test_plan.py), beside H: while factorizing, W's float32 working copy and two in x in
        float32 (a Cholesky factor beside H's working copy, then the inverse beside its factor) plus LAPACK's
        workspace (a quarter more, measured); then the inverse factor, W, the update of the columns after each
        block and the mask (9 bytes per entry; planned with 11, since the same 3072 x 3072 prune measures 142 or
        173 MiB from one run to the next, malloc's and BLAS's buffers, and the plan covers the higher), the
        result in a narrower weight dtype, and about a dozen [out, 128] float32 temporaries of the column block."""
        factorizing = out * inp * 4 + FACTORIZATION * inp * inp * 4
        updating = inp * inp * 4 + out * inp * (UPDATE_BYTES + (itemsize if itemsize != 4 else 0)) + 12 * out * 128 * 4
        return int(max(factorizing, updating))

    def prune_work(self, out, inp, structure, sparsity) -> Work:
        """The factorizations (about in^3), the updates after each column block (out x in^2 in all) and inside
        it (out x in x 128), one selection over W; per column about 25 small operations (indexing, the rank-1
        update; counted in benchmarks/plan_time.py's SparseGPT case)."""
        return Work(flops=inp ** 3 + out * inp * inp + 2 * out * inp * 128, selections=out * inp,
                    steps=25 * inp + 12 * -(-inp // 128))

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        # once no other linear shares this Hessian, its memory is reused for the factorization
        new, mask = sparsegpt_prune(weight, stats.hessian.H, sparsity, structure, overwrite_H=stats.last_use)
        return Pruned(mask, new)


@no_grad
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
    import torch
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


