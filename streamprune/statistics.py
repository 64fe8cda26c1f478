"""Statistics of every linear's input, gathered by forward pre-hooks during a block's dense pass.

What is gathered is what the pruner declares in `needs` (the attribute names of `LinearStats`):
- `sq_norm`: Wanda's s_j = (1/N) sum over all tokens of x_j^2, as the reference's float32 running mean over
  sequences: per batch of b sequences, s *= n/(n+b); n += b; s += ||x_j||^2 / n.
- `moments`: DSnoT's per-channel token mean, within-batch variance and running mean of token sums.
- `hessian`: SparseGPT's H = (2/n) sum x x^T as the reference's running mean (in^2 float32 per linear).

Data-parallel runs record each batch's contribution to `sq_norm` and `moments` and replay every rank's records
in the global batch order, so the float32 results are bit for bit a single process's. Hessians are too large to
record per batch; they are summed across ranks, which changes their float32 rounding slightly.

The statistics only need inputs, so once the first sequence has shown which linear runs last, the dense pass
stops right after that linear's hook: the rest of the block (typically the down projection) is not computed.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StopForward(Exception):
    """Raised from the last linear's hook: the statistics pass has what it needs from this sequence."""


class SquaredNorms:
    def __init__(self, columns: int, device=None):
        self.value = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    @staticmethod
    def contribution(x: torch.Tensor):
        b = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).t().float()
        return b, torch.norm(x, p=2, dim=1) ** 2

    def accumulate(self, b: int, sq: torch.Tensor) -> None:
        self.value *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        self.value += sq / self.nsamples


class ChannelMoments:
    """Per-channel input moments for DSnoT, accumulated like the reference's WrappedGPT.add_batch.

    `mean`: token mean of x_j. `var`: the token-weighted running mean of each batch's population variance
    (unbiased=False): within-batch variance, not the pooled variance of all tokens. `sum_mean`: the reference's
    `sum_metric_row`, the running mean over samples of each batch's token sums (same convention as SquaredNorms),
    i.e. L times the token mean for sequences of L tokens.
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
        """One batch's part: (samples, tokens, mean, variance, sum over tokens)."""
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


class HessianStats:
    """H = (2/n) * sum over all tokens of x x^T, float32, the reference's running mean over samples: per batch of
    b samples, H *= n/(n+b); n += b; X = sqrt(2/n) * x (tokens x in); H += X^T X."""

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


class LinearStats:
    """The statistics of one linear's input that the pruner asked for."""

    def __init__(self, needs: frozenset, columns: int, device, record: bool):
        self.record = record
        self.last_use = True     # see BlockStatistics.pop
        self.records: list = []  # data-parallel: (need, contribution) per batch, replayed by `reduce`
        self._sq = SquaredNorms(columns, device) if "sq_norm" in needs else None
        self.moments = ChannelMoments(columns, device) if "moments" in needs else None
        self.hessian = HessianStats(columns, device) if "hessian" in needs else None

    @property
    def sq_norm(self) -> torch.Tensor | None:
        return None if self._sq is None else self._sq.value

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        for need, acc in (("sq_norm", self._sq), ("moments", self.moments)):
            if acc is None:
                continue
            part = acc.contribution(x)
            if self.record:
                self.records.append((need, tuple(v.cpu() if torch.is_tensor(v) else v for v in part)))
            else:
                acc.accumulate(*part)
        if self.hessian is not None:
            self.hessian.add(x)

    def finite(self) -> bool:
        values = [self.sq_norm]
        if self.moments is not None:
            values += [self.moments.mean, self.moments.var, self.moments.sum_mean]
        if self.hessian is not None:
            values.append(self.hessian.H)
        return all(bool(torch.isfinite(v).all()) for v in values if v is not None)

    def replay(self, records: list) -> None:
        for need, part in records:
            acc = self._sq if need == "sq_norm" else self.moments
            dev = acc.mean.device if need == "moments" else acc.value.device
            acc.accumulate(*(v.to(dev) if torch.is_tensor(v) else v for v in part))


class BlockStatistics:
    """Pre-hooks on every nn.Linear of a block while the block runs its dense pass; a context manager.

    Linears that are called with the very same input tensor (q/k/v, gate/up) share one LinearStats once the
    first forward has shown it: the same values, computed (and held, for Hessians) once."""

    def __init__(self, block: nn.Module, needs: frozenset, record: bool = False, stop_early: bool = True):
        self.linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        self.stats = {n: LinearStats(needs, m.in_features, m.weight.device, record) for n, m in self.linears.items()}
        self.stop_early = stop_early
        self._first: list | None = []     # (name, module, input) per call during the first forward
        self._followers: set[str] = set()  # linears whose statistics are another's (same input)
        self._last: nn.Module | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self._followers:
                self.stats[name].add(x)
            if self._first is not None:
                self._first.append((name, module, x))
            elif module is self._last:
                raise StopForward
        return hook

    def forward_done(self) -> None:
        """After a forward that ran to the end. The first one fixes which linears share statistics and which
        linear ends later passes early; only when every linear ran exactly once (a block that calls one twice
        is left alone: no sharing, run to the end every time)."""
        if self._first is None:
            return
        calls, self._first = self._first, None
        names = [n for n, _, _ in calls]
        if len(names) != len(self.linears) or len(set(names)) != len(names):
            return
        leaders: dict = {}
        for name, _, x in calls:  # the inputs are still referenced here, so their ids are distinct
            leader = leaders.setdefault((id(x), x._version), name)
            if leader != name:
                self.stats[name] = self.stats[leader]  # its own first contribution was the same: dropped
                self._followers.add(name)
        if self.stop_early:
            self._last = calls[-1][1]

    def unique(self) -> dict:
        """name -> statistics, one name per distinct LinearStats (the first linear of a sharing group)."""
        out: dict = {}
        for n, st in self.stats.items():
            out.setdefault(id(st), (n, st))
        return dict(out.values())

    def reduce(self, dist) -> None:
        """Data-parallel: replay every rank's recorded batches in rank (= global batch) order; sum Hessians."""
        unique = self.unique()
        gathered = dist.gather({n: st.records for n, st in unique.items()})
        for n, st in unique.items():
            st.records = []
            for records in gathered:
                st.replay(records[n])
            if st.hessian is not None:
                hs = st.hessian
                count = hs.nsamples
                hs.H *= count
                dist.sum_(hs.H)
                hs.nsamples = sum(dist.gather(count))
                hs.H /= hs.nsamples

    def pop(self, name: str) -> LinearStats:
        """One linear's statistics, handed over; `last_use` says no other linear still needs them."""
        st = self.stats.pop(name)
        st.last_use = not any(other is st for other in self.stats.values())
        return st

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._first = None
        return False
