"""ADMM pruning with a weight update and gradual mask selection (Boza 2024, "Fast and Effective Weight Update for
Pruned Large Language Models", arXiv 2401.02938, "ADMM-Grad"), from the same H = (2/n) X^T X as SparseGPT
(statistics.HessianStats).

Per linear, the layer-wise problem is min ||W X - W' X||^2 over W' with W''s mask constraint, solved in
normalised coordinates: d = sqrt(diag H), Hn = D^-1 H D^-1 (unit diagonal), Wn = W D, so that |Wn| is Wanda's
metric (up to a constant) and one penalty rho suits every layer. The objective is damped toward the dense weight,
f(V) = tr((V - Wn) A (V - Wn)^T) with A = Hn + damp * I, and split as V = Z with Z masked (ADMM, scaled dual U):

    Z = P_t(V + U)                                 mask step: zero per row the k_t smallest |V + U|
    U = U + V - Z                                  dual step
    V = Wn + rho (Z - U - Wn) (A + rho I)^-1       weight step: argmin f(V) + rho/2 ||V - Z + U||^2

(the weight step is the paper's (Wn A + rho (Z - U)) (A + rho I)^-1 rewritten so that Wn A is never formed).
The mask is re-chosen during the first `gradual` iterations with the cubic schedule s_t = s (1 - (1 - t/g)^3),
t = 1..g, and then kept while the remaining iterations converge the weights on it; the result is the last Z,
un-normalised (Z D^-1). N:M: per group of M the M - N largest |V + U| are kept, and the gradual schedule prunes
the k_t smallest of the other candidates per row until every group has its N zeros.

Choices of ours, against the reference code (fmfi-compbio/admm-pruning): the mask is chosen per output row with
`select` (Wanda's rule, exact counts, ties to the lower index) rather than over the whole matrix, which makes
every step row-local, so a large matrix is processed a quarter of its rows at a time (four float32 row chunks,
allocated once: about SparseGPT's one float32 copy of W); dead input columns (H_jj = 0) are handled as SparseGPT
does (H_jj := 1, W[:, j] := 0). Memory: H (reused when no other linear shares it) and one in^2 float32 factor,
as SparseGPT; measured within 1% of SparseGPT's peak RSS (benchmarks/method_memory.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StreamPruneError
from ..choices import PLAN, PRUNE, Option
from .sparsegpt import FACTORIZATION
from .base import BYTES_PER_METRIC_ELEMENT, Method, Pruned, Structure, Work, check_prunable, row_chunks, no_grad, select

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the registry without it
    import torch


# bytes per element of a row chunk at ADMM's peak (W0, V, U, Z as float32, 16, plus the selection's 15 while
# `select` runs on them) against the 15 of a plain selection (BYTES_PER_METRIC_ELEMENT): the loop's row chunk is
# the plan's scaled by 15/31. Measured, a chunk takes about 58 bytes per element (temporaries of the float32
# copies and malloc's heap beside the four buffers): `workspace_bytes` plans with that figure
BYTES_PER_ELEMENT = 31
MEASURED_BYTES_PER_ELEMENT = 58
MIN_ROWS = 64  # rows per chunk at least: smaller products lose BLAS efficiency
SMALL_ELEMENTS = 1 << 20  # a matrix up to 4 MiB in float32 is not split (its workspace is small beside the block)


class ADMM(Method):
    name = "admm"
    summary = "ADMM weight update with gradual mask selection (the best quality, at SparseGPT's memory)"
    needs = frozenset({"hessian"})
    updates_weights = True
    options = tuple(Option(f"admm_{name}", default, help, type(default), output=True, group="admm",
                           commands=(PRUNE, PLAN)) for name, default, help in (
        ("iters", 20, "admm: iterations per linear."),
        ("gradual", 15, "admm: the first iterations re-choose the mask, sparsity rising on a cubic schedule."),
        ("rho", 1.0, "admm: the penalty, in coordinates where every input channel has unit second moment."),
        ("damp", 0.01, "admm: damping of the reconstruction toward the dense weight (same units).")))

    def __init__(self, iters: int = 20, gradual: int = 15, rho: float = 1.0, damp: float = 0.01):
        check_admm(iters, gradual, rho, damp)
        self.iters, self.gradual, self.rho, self.damp = iters, gradual, rho, damp

    def workspace_bytes(self, out, inp, itemsize, row_chunk) -> int:
        """Measured (tests/test_plan.py), beside H: while factorizing, two in x in float32 and LAPACK's workspace
        (as SparseGPT's); then the inverse, the result and the mask, and one row chunk's buffers."""
        rows = chunk_rows(out, inp, self._chunk(row_chunk))
        return int(max(FACTORIZATION * inp * inp * 4,
                       inp * inp * 4 + out * inp * (itemsize + 1) + rows * inp * MEASURED_BYTES_PER_ELEMENT))

    def prune_work(self, out, inp, structure, sparsity) -> Work:
        """The factorization (about in^3), one (rows x in) by (in x in) product per iteration, a selection per
        gradual iteration (two for N:M below N/M), about eight small operations per iteration and row chunk."""
        chunks = -(-out // chunk_rows(out, inp, 0))
        return Work(flops=inp ** 3 + 2 * self.iters * out * inp * inp,
                    selections=self.gradual * out * inp * (2 if structure.is_nm else 1),
                    steps=8 * self.iters * chunks)

    @staticmethod
    def _chunk(row_chunk: int) -> int:
        return max(1, row_chunk * BYTES_PER_METRIC_ELEMENT // BYTES_PER_ELEMENT) if row_chunk else 0

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        row_chunk = self._chunk(row_chunk)
        new, mask = admm_prune(weight, stats.hessian.H, sparsity, structure, iters=self.iters,
                               gradual=self.gradual, rho=self.rho, damp=self.damp, row_chunk=row_chunk,
                               overwrite_H=stats.last_use)
        return Pruned(mask, new)


def chunk_rows(out: int, inp: int, row_chunk: int) -> int:
    """Rows per chunk of ADMM's loop: a small matrix whole, else at most a quarter of the rows (and `row_chunk`)."""
    return out if out * inp <= SMALL_ELEMENTS else min(row_chunk or out, max(MIN_ROWS, -(-out // 4)))


def check_admm(iters: int, gradual: int, rho: float, damp: float) -> None:
    if iters < 1:
        raise StreamPruneError(f"--admm-iters {iters}: must be at least 1")
    if not 1 <= gradual <= iters:
        raise StreamPruneError(f"--admm-gradual {gradual}: must be between 1 and --admm-iters ({iters})")
    if not rho > 0:
        raise StreamPruneError(f"--admm-rho {rho}: must be positive")
    if not damp >= 0:
        raise StreamPruneError(f"--admm-damp {damp}: must be 0 or more")


def schedule(sparsity: float, t: int, gradual: int) -> float:
    """The mask's sparsity at iteration t (1-based) of the gradual phase: s (1 - (1 - t/g)^3), s at t = g."""
    return sparsity * (1 - (1 - min(t, gradual) / gradual) ** 3)


def admm_mask(v: torch.Tensor, sparsity: float, structure: Structure) -> torch.Tensor:
    """Per row, the entries zeroed at this step: unstructured, the int(in * sparsity) smallest |v|; N:M, the
    int(in * sparsity) smallest |v| among the N smallest of every group of M (all of them at sparsity N/M)."""
    a = v.abs()
    if not structure.is_nm:
        return select(a, sparsity, structure)
    candidates = select(a, 0.0, structure)
    if sparsity >= structure.n / structure.m:
        return candidates
    return select(a.masked_fill(~candidates, float("inf")), sparsity, Structure())


@no_grad
def admm_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, structure: Structure, *, iters: int = 20,
               gradual: int = 15, rho: float = 1.0, damp: float = 0.01, row_chunk: int = 0,
               overwrite_H: bool = False):
    """ADMM-Grad on one matrix (module docstring); returns `(new_weight, mask)`, new_weight in weight.dtype and
    +0 wherever the mask is set."""
    import torch
    out, inp = weight.shape
    check_prunable(inp, structure)
    check_admm(iters, gradual, rho, damp)
    if H.shape != (inp, inp):
        raise StreamPruneError(f"admm_prune: H is {tuple(H.shape)}, expected ({inp}, {inp})")
    target = structure.n / structure.m if structure.is_nm else sparsity
    A = H if (overwrite_H and H.dtype == torch.float32) else H.float().clone()
    diag_idx = torch.arange(inp, device=A.device)
    dead = torch.diag(A) == 0
    A[dead, dead] = 1
    d = torch.diag(A).sqrt()
    A.div_(d.reshape(1, -1)).div_(d.reshape(-1, 1))
    A[diag_idx, diag_idx] += damp + rho
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info):
        raise StreamPruneError("admm_prune: H + damping is not positive definite; raise --admm-damp")
    Ainv = torch.cholesky_inverse(L)  # (Hn + (damp + rho) I)^-1
    del L

    new = torch.empty(out, inp, dtype=weight.dtype, device=weight.device)
    mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
    # four float32 row chunks live at once (w0, U, Z, the product): for a large matrix a quarter of the rows at a
    # time keeps them at one float32 copy of W, SparseGPT's own working copy (a small one is done whole)
    chunk = chunk_rows(out, inp, row_chunk)
    zero = torch.zeros((), device=weight.device)
    for rows in row_chunks(out, chunk):
        w0 = weight[rows].float() * d.reshape(1, -1)
        w0[:, dead] = 0
        v, u, z = w0.clone(), torch.zeros_like(w0), torch.empty_like(w0)  # allocated once: no heap churn
        m = None
        for t in range(1, iters + 1):
            torch.add(v, u, out=z)                               # V + U
            if t <= gradual:
                m = admm_mask(z, schedule(target, t, gradual), structure)
            torch.where(m, z, zero, out=u)                       # U + V - Z: the masked part of V + U
            z.masked_fill_(m, 0).sub_(u).sub_(w0)                # Z - U - W0
            torch.matmul(z, Ainv, out=v)
            v.mul_(rho).add_(w0)
        z = v.add_(u).masked_fill_(m, 0)
        z.div_(d.reshape(1, -1))
        new[rows] = z.to(weight.dtype)  # +0 where masked: +0 / d is +0
        mask[rows] = m
    return new, mask
