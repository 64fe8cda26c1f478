"""The vocabulary every stage shares about a decoder block: the weights the pruner prunes (`Target`, `targets`),
Mixture-of-Experts modules, the routers found on a block, and the block's forward. Imports nothing else from the
package, so every module can use it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ROUTERS = "_streamprune_routers"  # set on a block by routing.find_routers: the local names of its router linears


def routers_of(block: nn.Module) -> frozenset:
    """The routers `routing.find_routers` found on this block (none before it ran)."""
    return getattr(block, ROUTERS, frozenset())


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


@dataclass(frozen=True)
class Target:
    """A weight the pruner prunes: an nn.Linear's `weight`, or a Mixture-of-Experts parameter holding one matrix
    per expert ([experts, out, in], or [experts, in, out] when `transposed`)."""
    name: str                 # local name of the parameter inside the block
    module: nn.Module
    attr: str                 # the parameter's attribute on `module`
    experts: int | None = None
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def matrix(self, tensor: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """The [out, in] view of expert `expert`'s matrix in `tensor` (the parameter, or a same-shaped mask)."""
        if expert is None:
            return tensor
        m = tensor[expert]
        return m.t() if self.transposed else m

    @property
    def label(self) -> str:
        """How summaries and reports name it: a linear by its module, an experts parameter by itself."""
        return self.name.removesuffix(".weight") if self.experts is None else self.name

    @property
    def in_features(self) -> int:
        w = self.weight
        return w.shape[-1] if self.experts is None or not self.transposed else w.shape[1]


def expert_count(module: nn.Module) -> int:
    """How many experts an experts module holds: the first dimension of its 3-D parameters."""
    return next(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)


def expert_parameters(module: nn.Module) -> list[str]:
    """The parameters of an experts module that hold one slice per expert (its matrices, and biases if any)."""
    count = expert_count(module)
    return [a for a, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == count]


def experts_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Modules holding Mixture-of-Experts weights: 3-D parameters sharing their first (expert) dimension. A
    convolution's 3-D kernel (a state-space layer's conv1d: Jamba, Qwen3.5's linear attention) is not one."""
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            continue
        cubes = [p for p in mod.parameters(recurse=False) if p.dim() == 3]
        if cubes and len({p.shape[0] for p in cubes}) == 1:
            out[name] = mod
    return out


def targets(block: nn.Module) -> list[Target]:
    """Every weight of the block the pruner prunes, in module order. Not pruned: routers (the linears whose
    outputs produce the routing, found from the block's own forward by routing.find_routers before a block is
    pruned) and linears that gate a Mixture-of-Experts block with one score per expert or a single scalar
    (Qwen2-MoE's shared_expert_gate): routing, not computation."""
    experts = experts_modules(block)
    gates = set(routers_of(block))
    for name, mod in experts.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        count = expert_count(mod)
        for sib_name, sib in block.named_modules():
            if (isinstance(sib, nn.Linear) and (sib_name.rsplit(".", 1)[0] if "." in sib_name else "") == parent
                    and sib.out_features in (count, 1)):
                gates.add(sib_name)
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name not in gates:
            out.append(Target(f"{name}.weight", mod, "weight"))
        elif name in experts:
            for attr, p in mod.named_parameters(recurse=False):
                if p.dim() == 3:
                    out.append(Target(f"{name}.{attr}" if name else attr, mod, attr, p.shape[0],
                                      bool(getattr(mod, "is_transposed", False))))
    return out
