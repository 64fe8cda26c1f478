"""Which linears of a Mixture-of-Experts block are routers, found from the block's own forward.

A router is whatever produces the routing: a linear whose output reaches a selection (top-k, sort, argmax) through
no other linear, where that selection's result reaches the call of an experts module (the routing index, or the
rows gathered by it), or a linear whose output is itself an argument of that call besides the hidden states (the
experts module scores them). Such a linear is never pruned: a pruned router changes which experts every token
reaches. Names and module classes play no part: JetMoE's `router.layer`, HunYuan's `gate.wg` and AFMoE's
`router.gate` are found the same way as any future family's.

How: one forward of the block on one batch, under a TorchFunctionMode that tracks data flow. Every tensor carries
a set of tags. Every parameter is tagged ("w", name) (a linear's weight by its module's name); a linear-like product
(F.linear, matmul, mm, bmm, addmm) one of whose operands carries only weight tags yields ("a", name): the output of
that linear (or of a router that is a bare Parameter), and nothing of its input (the o_projection before a router
feeds the router's input, not its output). Every other op passes on the
union of its inputs' tags (`type_as`, `to` and the `*_like` constructors only take a dtype or shape from the
other tensor: not its tags). A selection op records the "a" tags of its input and adds its own ("s", k) tag to its
results. When an experts module is entered, the selections whose tags reach its arguments name the routers. The
trace stops once every experts module of the block has been entered: nothing of the experts runs. Data flow is
structural: it does not depend on the weights' values, only on the ops the model's code runs; the block's first
calibration batch (or any input of its shape) shows it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .targets import ROUTERS, block_output, experts_modules

_TAG = "_streamprune_tags"

_PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
             torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm}
_SELECTIONS = {torch.topk, torch.Tensor.topk, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
               torch.argmax, torch.Tensor.argmax, torch.max, torch.Tensor.max, torch.kthvalue, torch.Tensor.kthvalue}


T = torch.Tensor
_SHAPED = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
           T.new_zeros, T.new_ones, T.new_empty, T.new_full}  # take only a shape, dtype and device from their input
_CAST = {T.type_as, T.to}  # the data of args[0]; the other argument gives a dtype or device


class _Entered(Exception):
    """Every experts module of the block has been entered: the trace has what it needs."""


def _tags(v) -> frozenset:
    return getattr(v, _TAG, frozenset()) if torch.is_tensor(v) else frozenset()


def _weight_only(tags: frozenset) -> bool:
    return bool(tags) and all(t[0] == "w" for t in tags)


class _Trace(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.selections: dict = {}  # k -> the linears whose outputs reach selection k's input
        self.routers: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [v for v in tree_flatten((args, kwargs))[0] if torch.is_tensor(v)]
        tags = frozenset().union(*(_tags(v) for v in inputs))
        if func in _SHAPED:
            tags = frozenset()
        elif func in _CAST:
            tags = _tags(args[0]) if args else frozenset()
        elif func in _PRODUCTS:
            n = 3 if func in (torch.addmm, torch.Tensor.addmm) else 2  # addmm: (bias, input, weight)
            weights = [_tags(v) for v in args[:n] if torch.is_tensor(v) and _weight_only(_tags(v))]
            if len(weights) == 1:
                tags = frozenset(("a", t[1]) for t in weights[0])
        elif func in _SELECTIONS:
            k = len(self.selections)
            self.selections[k] = {t[1] for t in tags if t[0] == "a"}
            tags = tags | {("s", k)}
        if tags:
            written = [args[0]] if args and (func is torch.Tensor.__setitem__ or
                                             getattr(func, "__name__", "").endswith("_")) else []
            for v in tree_flatten(out)[0] + written:
                if torch.is_tensor(v):
                    try:
                        setattr(v, _TAG, tags)
                    except (AttributeError, RuntimeError):
                        pass
        return out

    def entered(self, args: tuple, kwargs: dict) -> None:
        """An experts module's call: the routers its arguments show."""
        values = [v for v in tree_flatten((args, kwargs))[0] if torch.is_tensor(v)]
        hidden = args[0] if args else kwargs.get("hidden_states")
        for v in values:
            for t in _tags(v):
                if t[0] == "s":
                    self.routers |= self.selections[t[1]]
                elif t[0] == "a" and v is not hidden:
                    self.routers.add(t[1])


@torch.no_grad()
def find_routers(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> frozenset:
    """The local names of `block`'s router linears (see the module docstring), from one forward of the block on
    `hidden` (its weights loaded, or its experts on meta: they are never reached). The block's inputs are tagged
    ("x", ...): an activation, so a norm's output is not mistaken for a weight. Also stored on the block
    (targets.ROUTERS), where `targets.targets` reads it."""
    experts = experts_modules(block)
    if not experts:
        setattr(block, ROUTERS, frozenset())
        return frozenset()
    linears = {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
    trace, seen, handles = _Trace(), set(), []

    def enter(name):
        def hook(module, args, kwargs):
            trace.entered(args, kwargs)
            seen.add(name)
            if len(seen) == len(experts):
                raise _Entered
        return hook

    for name, mod in experts.items():
        handles.append(mod.register_forward_pre_hook(enter(name), with_kwargs=True))
    params = {}  # every parameter is a weight: a product with a router that is a bare Parameter starts afresh too
    for name, p in block.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        params[name] = p
        setattr(p, _TAG, frozenset({("w", owner if owner in linears else name)}))
    inputs = [hidden] + [v for v in tree_flatten(kwargs)[0] if torch.is_tensor(v)]
    for v in inputs:
        setattr(v, _TAG, frozenset({("x", "input")}))
    try:
        with trace:
            block_output(block, hidden, kwargs)
    except _Entered:
        pass
    finally:
        for h in handles:
            h.remove()
        for p in list(params.values()) + inputs:
            if hasattr(p, _TAG):
                delattr(p, _TAG)
    found = frozenset(n for n in trace.routers if n in linears)
    setattr(block, ROUTERS, found)
    return found
