"""A block's experts streamed through the compute device in groups: blocks larger than the card (DeepSeek-V3).

The whole-block path holds every expert's matrices on the device. Here the experts module's parameters stay
on the host as read (the checkpoint's dtype and layout: FP8 codes, one tensor per expert), and one group of
experts at a time is assembled in the compute dtype on the device, used, pruned and written back into those host
tensors. The model's own code does all the computing:

1. the block runs up to its experts module, whose call (hidden states, routing) is recorded per batch, and stops;
2. the experts module's own forward runs once per group on each recorded call, its parameters replaced by the
   group's slices and the routing re-indexed into the group: experts outside it get the index `num_experts`,
   which transformers' expert loop skips (an architecture whose loop does not, gpt-oss, is refused). The loop's
   output buffer (its `zeros_like` of the hidden states) is handed the sum of the groups before, so every expert
   is added in the order of the whole-block loop: the output is bit for bit the whole block's;
3. the block runs again with the experts module returning that sum.

Each expert's statistics come from step 2 (the rows the router sent it, batch by batch, as in the whole block),
every other linear's from step 3; a group is pruned right after its statistics, so only one group's Hessians
exist at a time. The propagation repeats 1-3 on the pruned block, the groups read back from the host tensors: for
mask-only methods and exact casts these are the pruned values themselves; a weight-updating method (SparseGPT,
ADMM) whose compute dtype is wider than the checkpoint's propagates through the weights as written (rounded to
the checkpoint's dtype) where the whole block propagates through its compute-dtype values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import StreamPruneError
from .memory import trim
from .targets import expert_count, expert_parameters, experts_modules, set_tensor
from .statistics import StopForward, map_routing


@dataclass
class ExpertSource:
    """Where a grouped block's experts come from and go back to: the block's host tensors (`kept` of
    StreamedModel.load_block), `size` experts at a time. `store` is where recorded calls live between steps."""
    model: object           # model.StreamedModel
    index: int              # the block
    kept: dict
    module_name: str        # the experts module, local to the block
    params: list            # its per-expert parameters (attribute names)
    size: int
    store: torch.device     # beside the activations: the device when they are on it, else the host

    def local(self, attr: str) -> str:
        return f"{self.module_name}.{attr}" if self.module_name else attr

    def value(self, attr: str, group: tuple) -> torch.Tensor:
        return self.model.group_value(self.model.block_prefix(self.index) + self.local(attr), self.kept, group)

    def needs_mask(self, attr: str) -> bool:
        """Whether writing `attr` back needs its mask: an original the compute dtype cannot represent is zeroed
        where pruned (the other pieces are written from the computed values)."""
        return self.model.inexact_pieces(self.model.block_prefix(self.index) + self.local(attr), self.kept)

    def write(self, attr: str, group: tuple, value: torch.Tensor, mask, recomputed: bool) -> None:
        self.model.store_group(self.model.block_prefix(self.index) + self.local(attr), self.kept, group, value,
                               mask, recomputed)


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _to(v, device):
    return v.to(device, non_blocking=True) if torch.is_tensor(v) else v


class Calls:
    """The experts module's call of every batch of one pass: recorded in step 1, replayed in steps 2 and 3."""

    def __init__(self, store: torch.device):
        self.store = store
        self.recorded: dict = {}    # batch -> (args, kwargs, sequences), on `store`
        self.outputs: dict = {}     # batch -> the experts' summed output, on `store`
        self.batch = None           # the batch the block loop is running (BlockLoop.forward_all sets it)
        self.sequences = None

    def record(self, *args, **kwargs):
        self.recorded[self.batch] = (tuple(_to(a, self.store) for a in args),
                                     {k: _to(v, self.store) for k, v in kwargs.items()}, self.sequences)
        raise StopForward

    def replay(self, *args, **kwargs):
        out = self.outputs[self.batch]
        device = hidden_of(args, kwargs).device
        return out.clone() if out.device == device else out.to(device)  # the block may add to it in place

    def on(self, device, batch):
        args, kwargs, sequences = self.recorded[batch]
        return tuple(_to(a, device) for a in args), {k: _to(v, device) for k, v in kwargs.items()}, sequences


class Replaced:
    """`module.forward` replaced by `fn` (an instance attribute, so nn.Module's call and its hooks still run)."""

    def __init__(self, module: nn.Module, fn):
        self.module, self.fn = module, fn

    def __enter__(self):
        self.module.forward = self.fn
        return self

    def __exit__(self, *exc):
        del self.module.forward
        return False


def in_group(args: tuple, kwargs: dict, group: tuple, count: int):
    """The call with its routing index re-indexed into `group` = (first, stop): its experts 0 .. size-1, every
    other expert `count` (the index the expert loop skips)."""
    g0, g1 = group
    return map_routing(args, kwargs, lambda v: torch.where((v >= g0) & (v < g1), v - g0, torch.full_like(v, count)))


def groups(count: int, size: int) -> list[tuple]:
    return [(g0, min(count, g0 + size)) for g0 in range(0, count, size)]


def group_call(module: nn.Module, calls: Calls, k: int, stats, group: tuple, count: int, name: str, device) -> None:
    """Step 2 for recorded call `k`: the module's forward on the group (its parameters set by the caller), watched
    by `stats` (a statistics.GroupStatistics), its part added to the call's summed output."""
    args, kwargs, sequences = calls.on(device, k)
    args, kwargs = in_group(args, kwargs, group, count)
    hidden = hidden_of(args, kwargs)
    acc = calls.outputs.get(k)
    acc = torch.zeros_like(hidden) if acc is None else acc.to(device, non_blocking=True)
    try:
        out, used = stats.run(lambda: module(*args, **kwargs), sequences, hidden, acc)
    except (RuntimeError, IndexError) as e:
        refuse_unsupported(e, name)
    if not used:  # an expert loop that does not start from zeros_like(hidden): add its part (not bit-exact)
        acc += out
    calls.outputs[k] = acc if acc.device == calls.store else acc.to(calls.store)


def each_group(module: nn.Module, src: ExpertSource, stop=lambda: False, stopped=Exception):
    """Every group of the module's experts in turn: yields (first, stop) with the group's slices, read from the
    host tensors, as the module's parameters on the device; afterwards the parameters go back to meta and the
    host's freed pages to the OS. `stop()` true before a group raises `stopped`."""
    shapes = {a: getattr(module, a).shape for a in src.params}
    for group in groups(expert_count(module), src.size):
        if stop():
            raise stopped
        for a in src.params:
            set_tensor(module, a, src.value(a, group))
        yield group
        for a in src.params:
            set_tensor(module, a, torch.empty(shapes[a], device="meta"))
        trim()


@torch.no_grad()
def sum_outputs(module: nn.Module, mine: list, src: ExpertSource, calls: Calls, device, stop=lambda: False,
                stopped=Exception) -> None:
    """Step 2 without statistics or pruning (the propagation, the streamed evaluation): every group's part of
    each recorded call's output added."""
    from .statistics import GroupStatistics

    count = expert_count(module)
    for group in each_group(module, src, stop, stopped):
        watch = GroupStatistics(mine, {a: getattr(module, a) for a in src.params}, group[0], group[1] - group[0],
                                frozenset(), False)
        for k in list(calls.recorded):
            group_call(module, calls, k, watch, group, count, src.module_name, device)
        del watch


def check_blocks(blocks, hidden: int, dtype: torch.dtype) -> str | None:
    """Can these blocks' experts be streamed in groups? Why not (a phrase), or None after probing the first experts
    module with check_skips (which refuses on its own)."""
    if any(len(experts_modules(b)) > 1 for b in blocks):
        return "for blocks with more than one experts module"
    found = next((m for b in blocks for m in experts_modules(b).items()), None)
    if found is not None:
        check_skips(found[1], found[0], expert_parameters(found[1]), hidden, dtype)
    return None


@torch.no_grad()
def check_skips(module: nn.Module, name: str, params: list, hidden: int, dtype: torch.dtype) -> None:
    """Refuse, before anything is written, an experts module that cannot run one group: its own forward on a group
    of expert 0 alone (all-ones matrices) with two tokens routed to expert 1, re-indexed as a group run is; the
    output must be exactly zero (expert 1 skipped, nothing computed)."""
    count = expert_count(module)
    shapes = {a: getattr(module, a).shape for a in params}
    try:
        for a in params:
            set_tensor(module, a, torch.ones((1,) + tuple(shapes[a][1:]), dtype=dtype))
        x = torch.ones(2, hidden, dtype=dtype)
        args, kwargs = in_group((x, torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=dtype)), {}, (0, 1),
                                count)
        out = module(*args, **kwargs)
        if not torch.is_tensor(out) or out.shape != x.shape:
            raise RuntimeError("its output is not the hidden states' shape")
        if bool(out.ne(0).any()):
            raise RuntimeError("it computed an expert outside the group")
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        refuse_unsupported(e, name)
    finally:
        for a in params:
            set_tensor(module, a, torch.empty(shapes[a], device="meta"))


def refuse_unsupported(err: Exception, module_name: str) -> None:
    raise StreamPruneError(f"{module_name}: this architecture's experts cannot be run one group at a time (its "
                           f"expert loop does not skip the index num_experts: {str(err).splitlines()[0][:100]}); "
                           f"its blocks need a device that holds a whole block") from None
