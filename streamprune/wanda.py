"""Per-channel input statistics and the pruning masks (wanda-spec.md, exactly).

Statistics follow the reference's running mean in float32. Masks are computed in row chunks: every rule here
is per output row (or per matrix for magnitude, which needs one global threshold first), so chunking bounds
the transient memory of the metric and the sort without changing a single entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import StreamPruneError


@dataclass(frozen=True)
class Structure:
    """Unstructured (n = m = 0, `sparsity` applies) or N:M (n of every m consecutive inputs zeroed)."""
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | None) -> "Structure":
        if text in (None, "", "unstructured"):
            return cls()
        try:
            n, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise StreamPruneError(f"--structure {text!r}: expected 'unstructured' or N:M such as 2:4") from None
        if not 0 < n < m:
            raise StreamPruneError(f"--structure {text}: N:M needs 0 < N < M (N weights zeroed in every M)")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


class InputStats:
    """Forward hooks on every nn.Linear of a block: running float32 mean of squared input norms.

    With `record=True` (data-parallel runs) each batch's contribution is kept instead and `reduce` replays every
    rank's contributions in the global batch order: the same float32 operations as a single process.
    """

    def __init__(self, block: nn.Module, record: bool = False):
        self.linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        self.scaler = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
                       for n, m in self.linears.items()}
        self.count = {n: 0 for n in self.linears}
        self.records = {n: [] for n in self.linears} if record else None
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            b = x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1]).t().float()
            sq = torch.norm(x, p=2, dim=1) ** 2
            if self.records is not None:
                self.records[name].append((b, sq.cpu()))
            else:
                self._add(name, b, sq)
        return hook

    def _add(self, name: str, b: int, sq: torch.Tensor) -> None:
        s, n = self.scaler[name], self.count[name]
        s *= n / (n + b)
        n += b
        s += sq / n
        self.count[name] = n

    def reduce(self, dist) -> None:
        """Replay all ranks' recorded batches (rank order = global batch order)."""
        for records in dist.gather(self.records):
            for name, items in records.items():
                for b, sq in items:
                    self._add(name, b, sq.to(self.scaler[name].device))
        self.records = {n: [] for n in self.linears}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _row_chunks(rows: int, chunk: int):
    chunk = max(1, chunk or rows)
    for r in range(0, rows, chunk):
        yield slice(r, min(rows, r + chunk))


def wanda_mask(weight: torch.Tensor, scaler: torch.Tensor, sparsity: float, structure: Structure,
               row_chunk: int = 0) -> torch.Tensor:
    """Boolean mask of the weights to zero: smallest |W| * sqrt(s) per row (stable) or per N:M group (topk)."""
    out, inp = weight.shape
    check_prunable(inp, structure)
    mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
    root = torch.sqrt(scaler.float().reshape(1, -1))
    for rows in _row_chunks(out, row_chunk):
        metric = weight[rows].float().abs() * root
        mask[rows] = _select(metric, sparsity, structure)
    return mask


def _select(metric: torch.Tensor, sparsity: float, structure: Structure) -> torch.Tensor:
    rows, inp = metric.shape
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if structure.is_nm:
        groups = metric.reshape(rows, inp // structure.m, structure.m)
        idx = torch.topk(groups, structure.n, dim=-1, largest=False)[1]
        mask.view(rows, inp // structure.m, structure.m).scatter_(2, idx, True)
    else:
        k = int(inp * sparsity)
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, structure: Structure, row_chunk: int = 0) -> torch.Tensor:
    """The baseline: one |W| threshold per matrix (zero everything <= the k-th smallest), or N:M on |W|."""
    out, inp = weight.shape
    check_prunable(inp, structure)
    if structure.is_nm:
        mask = torch.zeros(out, inp, dtype=torch.bool, device=weight.device)
        for rows in _row_chunks(out, row_chunk):
            mask[rows] = _select(weight[rows].float().abs(), sparsity, structure)
        return mask
    k = int(weight.numel() * sparsity)
    thresh = torch.kthvalue(weight.float().abs().flatten(), k + 1).values if k < weight.numel() else float("inf")
    return weight.float().abs() <= thresh


def check_prunable(in_features: int, structure: Structure) -> None:
    if structure.is_nm and in_features % structure.m:
        raise StreamPruneError(f"--structure {structure}: a linear has in_features {in_features}, not divisible by M={structure.m}")
