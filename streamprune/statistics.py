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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import StreamPruneError


class StopForward(Exception):
    """Raised from the last linear's hook: the statistics pass has what it needs from this sequence."""


class SquaredNorms:
    def __init__(self, columns: int, device=None):
        self.value = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    @staticmethod
    def contribution(x: torch.Tensor, b: int | None = None):
        b = b if b is not None else (x.shape[0] if x.dim() == 3 else 1)
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
    def add(self, x: torch.Tensor, b: int | None = None) -> None:
        self.accumulate(*self.contribution(x, b))

    @staticmethod
    def contribution(x: torch.Tensor, b: int | None = None):
        """One batch's part: (samples, tokens, mean, variance, sum over tokens)."""
        b = b if b is not None else (x.shape[0] if x.dim() == 3 else 1)
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:  # an expert no token of this batch was routed to
            zero = x.new_zeros(x.shape[1])
            return b, 0, zero, zero, zero
        return b, x.shape[0], x.mean(0), x.var(0, unbiased=False), x.sum(0)

    def accumulate(self, b: int, t: int, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        if t == 0:
            pass
        elif self.ntokens == 0:
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
    def add(self, x: torch.Tensor, b: int | None = None) -> None:
        b = b if b is not None else (x.shape[0] if x.dim() == 3 else 1)
        x = x.reshape(-1, x.shape[-1])
        self.H *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.t().matmul(x)


class LinearStats:
    """The statistics of one linear's input that the pruner asked for."""

    def __init__(self, needs: frozenset, columns: int, device, record: bool):
        self.record, self.needs = record, needs
        self.last_use = True     # see BlockStatistics.pop
        self.tokens = 0          # how many token rows reached this input (an expert's: those routed to it)
        self.records: list = []  # data-parallel: (need, contribution) per batch, replayed by `reduce`
        self._sq = SquaredNorms(columns, device) if "sq_norm" in needs else None
        self.moments = ChannelMoments(columns, device) if "moments" in needs else None
        self.hessian = HessianStats(columns, device) if "hessian" in needs else None

    @property
    def sq_norm(self) -> torch.Tensor | None:
        return None if self._sq is None else self._sq.value

    @torch.no_grad()
    def add(self, x: torch.Tensor, b: int | None = None) -> None:
        """One batch: `x` its rows reaching this input; `b` its sequences (default: x's batch dimension)."""
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if self.record:
            self.records.append(("tokens", rows))
        else:
            self.tokens += rows
        for need, acc in (("sq_norm", self._sq), ("moments", self.moments)):
            if acc is None:
                continue
            part = acc.contribution(x, b)
            if self.record:
                self.records.append((need, tuple(v.cpu() if torch.is_tensor(v) else v for v in part)))
            else:
                acc.accumulate(*part)
        if self.hessian is not None:
            self.hessian.add(x, b)

    def finite(self) -> bool:
        values = [self.sq_norm]
        if self.moments is not None:
            values += [self.moments.mean, self.moments.var, self.moments.sum_mean]
        if self.hessian is not None:
            values.append(self.hessian.H)
        return all(bool(torch.isfinite(v).all()) for v in values if v is not None)

    def replay(self, records: list) -> None:
        for need, part in records:
            if need == "tokens":
                self.tokens += part
                continue
            acc = self._sq if need == "sq_norm" else self.moments
            dev = acc.mean.device if need == "moments" else acc.value.device
            acc.accumulate(*(v.to(dev) if torch.is_tensor(v) else v for v in part))


_LINEAR_FUNCS = (F.linear, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul)


class _ExpertCalls(TorchFunctionMode):
    """Active while an experts module runs its (eager) forward: every matmul whose weight is one expert's slice
    of a 3-D parameter is reported with its input rows, the tokens the model's own router sent there."""

    def __init__(self, owner, targets: dict, hidden: torch.Tensor | None = None, acc: torch.Tensor | None = None):
        super().__init__()
        self.owner, self.targets = owner, targets  # id(parameter) -> (Target, index of its first expert)
        self.hidden, self.acc, self.accumulated = hidden, acc, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.zeros_like and self.acc is not None and args and args[0] is self.hidden:
            self.accumulated = True  # the expert loop's output buffer: carry on from the groups before (groups.py)
            return self.acc
        if func in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            base = getattr(w, "_base", None)
            target, first = self.targets.get(id(base), (None, 0)) if base is not None else (None, 0)
            if target is not None:
                expert = first + (w.storage_offset() - base.storage_offset()) // base.stride(0)
                if (func is F.linear) == target.transposed:
                    raise StreamPruneError(f"{target.name}: the experts module computes with the expert matrices "
                                           f"in an orientation streamprune does not expect; not supported")
                self.owner._expert_rows(target, expert, x)
        return func(*args, **kwargs)


class _Gathered:
    """What every set of statistics offers once gathered: `stats` keyed by (target name, expert or None)."""
    stats: dict

    def unique(self) -> dict:
        """key -> statistics, one key per distinct LinearStats (the first target of a sharing group)."""
        out: dict = {}
        for k, st in self.stats.items():
            out.setdefault(id(st), (k, st))
        return dict(out.values())

    def reduce(self, dist) -> None:
        """Data-parallel: replay every rank's recorded batches in rank (= global batch) order; sum Hessians."""
        unique = self.unique()
        gathered = dist.gather({k: st.records for k, st in unique.items()})
        for k, st in unique.items():
            st.records = []
            for records in gathered:
                st.replay(records[k])
            if st.hessian is not None:
                hs = st.hessian
                count = hs.nsamples
                hs.H *= count
                dist.sum_(hs.H)
                hs.nsamples = sum(dist.gather(count))
                hs.H /= hs.nsamples

    def pop(self, key) -> LinearStats:
        """One target's statistics, handed over; `last_use` says no other target still needs them."""
        st = self.stats.pop(key)
        st.last_use = not any(other is st for other in self.stats.values())
        return st


class BlockStatistics(_Gathered):
    """Hooks on every pruning target of a block while the block runs its dense pass; a context manager.

    Linears: forward pre-hooks; linears called with the very same input tensor (q/k/v, gate/up) share one
    LinearStats once the first forward has shown it. Experts: the experts module runs its eager forward under
    `_ExpertCalls`, and each expert's matrices get the statistics of the rows routed to it (an expert no token of a
    batch reached still counts that batch's sequences). Keys: (target name, expert or None).

    `force` ({experts module name: [expert, ...]}) instead routes every token to the given experts, through the
    module's own code, and stops the block right after: the statistics an expert would have if all tokens went
    to it (the fallback for experts the calibration data barely reached)."""

    def __init__(self, block: nn.Module, needs, record: bool = False, stop_early: bool = True,
                 force: dict | None = None, only=None):
        """`needs`: the statistics every target needs, or a function of the target (structured width needs a
        Hessian of the down projection's input only). `only`: a predicate choosing the targets to watch (expert
        groups gather the experts' statistics elsewhere, groups.py)."""
        from .targets import experts_modules, targets

        self.targets = [t for t in targets(block) if only is None or only(t)]
        self.stats: dict = {}
        for t in self.targets:
            dev = t.weight.device
            for e in ([None] if t.experts is None else range(t.experts)):
                self.stats[(t.name, e)] = LinearStats(needs(t) if callable(needs) else needs, t.in_features, dev,
                                                      record)
        self.stop_early, self.force, self.batch = stop_early, force or {}, None
        self._first: list | None = []     # (unit, input) per call during the first forward
        self._followers: set = set()       # linear targets whose statistics are another's (same input)
        self._last = None
        self.handles = []
        for t in self.targets:
            if t.experts is None:
                self.handles.append(t.module.register_forward_pre_hook(self._linear_hook(t)))
        experts = experts_modules(block)
        for name, mod in experts.items():
            mine = {id(t.weight): (t, 0) for t in self.targets if t.module is mod}
            if not mine:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._experts_enter(name, mine), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._experts_exit(name, mine), with_kwargs=True))

    # ------------------------------------------------------------------ hooks

    def _linear_hook(self, t):
        key = (t.name, None)

        def hook(module, args):
            x = args[0]
            if key not in self._followers:
                self.stats[key].add(x)
            self._called(module, x)
        return hook

    def _experts_enter(self, name: str, mine: dict):
        def hook(module, args, kwargs):
            self._hit = set()
            module._streamprune_mode = _ExpertCalls(self, mine)
            module._streamprune_mode.__enter__()
            if name in self.force:
                return _forced_routing(args, kwargs, self.force[name])
        return hook

    def _experts_exit(self, name: str, mine: dict):
        def hook(module, args, kwargs, output):
            module._streamprune_mode.__exit__(None, None, None)
            del module._streamprune_mode
            for t, _ in mine.values():  # experts this batch did not reach still count its sequences
                for e in range(t.experts):
                    if (t.name, e) not in self._hit:
                        width = t.in_features
                        self.stats[(t.name, e)].add(args[0].new_zeros(0, width), self._batch())
            if self.force:
                raise StopForward
            self._called(module, None)
        return hook

    def _expert_rows(self, target, expert: int, x: torch.Tensor) -> None:
        key = (target.name, expert)
        self._hit.add(key)
        self.stats[key].add(x.reshape(-1, x.shape[-1]), self._batch())

    def _batch(self) -> int:
        if self.batch is None:
            raise StreamPruneError("internal: the batch size of an experts forward is unknown")
        return self.batch

    def _called(self, unit, x) -> None:
        if self._first is not None:
            self._first.append((unit, x))
        elif unit is self._last:
            raise StopForward

    def forward_done(self) -> None:
        """After a forward that ran to the end. The first one fixes which linears share statistics and which
        unit (a linear, or an experts module) ends later passes early; only when every unit ran exactly once (a
        block that calls one twice is left alone: no sharing, run to the end every time)."""
        if self._first is None:
            return
        calls, self._first = self._first, None
        units = [u for u, _ in calls]
        expected = {id(t.module) for t in self.targets}
        if len(units) != len(expected) or len({id(u) for u in units}) != len(units):
            return
        names = {id(t.module): t.name for t in self.targets if t.experts is None}
        leaders: dict = {}
        for unit, x in calls:  # the inputs are still referenced here, so their ids are distinct
            if x is None:
                continue
            leader = leaders.setdefault((id(x), x._version), names[id(unit)])
            key = (names[id(unit)], None)
            if leader != key[0] and self.stats[(leader, None)].needs == self.stats[key].needs:
                self.stats[key] = self.stats[(leader, None)]  # same values: its own dropped
                self._followers.add(key)
        if self.stop_early:
            self._last = units[-1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._first = None
        return False


def map_routing(args: tuple, kwargs: dict, index_fn, weights_fn=None):
    """An experts module's call with its routing replaced: the routing index is the one integer [tokens, k] tensor
    among the arguments (refused unless there is exactly one), its weights the float tensor of the same shape.
    `index_fn(index)` and `weights_fn(weights)` give the new ones."""
    hidden = args[0] if args else kwargs["hidden_states"]
    tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    found = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v is not hidden and v.dim() == 2
             and v.shape[0] == tokens and not v.is_floating_point()]
    if len(found) != 1:
        raise StreamPruneError(f"the experts module is called with {len(found)} integer [tokens, k] tensors, not one "
                               f"routing index: streamprune cannot route its tokens; not supported")
    index = found[0]

    def swap(v):
        if v is index:
            return index_fn(v)
        if weights_fn is not None and torch.is_tensor(v) and v is not hidden and v.is_floating_point() \
                and v.shape == index.shape:
            return weights_fn(v)
        return v
    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _forced_routing(args: tuple, kwargs: dict, experts: list[int]):
    """The experts module's call with every token routed to `experts` (weight 1 each)."""
    def index(v):
        return torch.tensor(experts, dtype=v.dtype, device=v.device).expand(v.shape[0], len(experts))

    def weights(v):
        return torch.ones(v.shape[0], len(experts), dtype=v.dtype, device=v.device)
    return map_routing(args, kwargs, index, weights)


class GroupStatistics(_Gathered):
    """The statistics of one group of experts (experts `first` .. `first + len - 1` of one experts module),
    gathered while the module's own forward runs on recorded calls with the group's slices as its parameters
    (groups.py). The same rows in the same batch order as BlockStatistics would see in the whole block."""

    def __init__(self, targets: list, params: dict, first: int, count: int, needs, record: bool):
        """`targets`: the module's Targets; `params`: attribute -> the group's parameter now on the module."""
        self.targets, self.first, self.count = targets, first, count
        self.ids = {id(params[t.attr]): (t, first) for t in targets}
        self.stats = {(t.name, e): LinearStats(needs, t.in_features, params[t.attr].device, record)
                      for t in targets for e in range(first, first + count)}
        self.batch = None

    def run(self, call, batch: int, hidden: torch.Tensor | None = None, acc: torch.Tensor | None = None):
        """`call()` (the module on one recorded batch of `batch` sequences) with its expert matmuls watched; its
        output buffer is `acc` when given. Returns (output, whether the module wrote into `acc`)."""
        self.batch, self._hit = batch, set()
        mode = _ExpertCalls(self, self.ids, hidden, acc)
        with mode:
            out = call()
        for t in self.targets:  # experts this batch did not reach still count its sequences
            for e in range(self.first, self.first + self.count):
                if (t.name, e) not in self._hit:
                    self.stats[(t.name, e)].add(out.new_zeros(0, t.in_features), batch)
        return out, mode.accumulated

    def _expert_rows(self, target, expert: int, x: torch.Tensor) -> None:
        key = (target.name, expert)
        self._hit.add(key)
        self.stats[key].add(x.reshape(-1, x.shape[-1]), self.batch)
