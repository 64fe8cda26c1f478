"""An in-memory reference, written from wanda-spec.md: whole model in memory, batch 1, float32.

Deliberately independent of streamprune's machinery: block i's statistics come from full-model forwards in
which blocks 0..i-1 are already pruned in place (hooks on block i's linears, a stop right after block i).
The follow-up methods use streamprune.methods' per-matrix rules (verified on their own in test_methods.py);
what this reference checks is everything around them: which statistics, from which activations, in which order.
"""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def _collect(model, layer, ids, hooks_for, batch_size=1):
    """Run full forwards (batches of `batch_size`, stop after `layer`) with the hooks `hooks_for(lin)` on each of
    its linears."""
    linears = [mod for mod in layer.modules() if isinstance(mod, nn.Linear)]
    handles = [lin.register_forward_hook(h) for lin in linears for h in hooks_for(lin)]
    handles.append(layer.register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop())))
    for s in range(0, ids.shape[0], batch_size):
        try:
            model(input_ids=ids[s:s + batch_size], use_cache=False)
        except _Stop:
            pass
    for h in handles:
        h.remove()
    return linears


class _Scaler:
    def __init__(self, lin):
        self.s, self.n = torch.zeros(lin.in_features, dtype=torch.float32), 0

    def __call__(self, lin, args, output):
        inp = args[0]
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.s *= self.n / (self.n + tmp)
        self.n += tmp
        inp = inp.type(torch.float32)
        self.s += torch.norm(inp, p=2, dim=1) ** 2 / self.n


def _hook(accumulator):
    return lambda module, args, output: accumulator.add(args[0])


def _ria_score(W, s, alpha=0.5):
    """RIA's score from its formula: (|W|/column sum + |W|/row sum) * sqrt(s) ** alpha, float32."""
    a = W.float().abs()
    col, row = a.sum(0, keepdim=True), a.sum(1, keepdim=True)
    col = torch.where(col == 0, torch.ones_like(col), col)
    row = torch.where(row == 0, torch.ones_like(row), row)
    return (a / col + a / row) * torch.sqrt(s.float().reshape(1, -1)) ** alpha


def _mask(metric, sparsity, n, m):
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if m:
        for ii in range(0, metric.shape[1], m):
            tmp = metric[:, ii:ii + m].float()
            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    else:
        indices = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
        mask.scatter_(1, indices, True)
    return mask


@torch.no_grad()
def reference_prune(model, ids: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    method: str = "wanda", refine: str | None = None, profile: str = "uniform",
                    owl_lambda: float = 0.08, owl_m: float = 5.0, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Prune `model` in place; return {parameter name: bool mask of zeroed weights}."""
    from streamprune.methods.dsnot import dsnot_refine
    from streamprune.methods.owl import owl_outlier_ratio, owl_sparsities
    from streamprune.methods.sparsegpt import sparsegpt_prune
    from streamprune.methods import Structure
    from streamprune.statistics import ChannelMoments, HessianStats

    masks, names = {}, {mod: name for name, mod in model.named_modules()}
    layers = decoder_layers(model)
    targets = [sparsity] * len(layers)
    if profile == "owl":  # the dense sweep: every block's statistics from the still dense model
        ratios = []
        for layer in layers:
            scalers = {}
            linears = _collect(model, layer, ids, lambda lin: [scalers.setdefault(lin, _Scaler(lin))])
            ratios.append(owl_outlier_ratio([(lin.weight, scalers[lin].s) for lin in linears], hyper_m=owl_m))
        targets = owl_sparsities(ratios, sparsity, owl_lambda)

    for layer, target in zip(layers, targets):
        scalers, moments, hessians = {}, {}, {}

        def hooks(lin):
            if method == "magnitude":
                return []
            out = [scalers.setdefault(lin, _Scaler(lin))]
            if refine == "dsnot":
                out.append(_hook(moments.setdefault(lin, ChannelMoments(lin.in_features))))
            if method == "sparsegpt":
                out.append(_hook(hessians.setdefault(lin, HessianStats(lin.in_features))))
            return out

        linears = _collect(model, layer, ids, hooks, batch_size) if method != "magnitude" else \
            [mod for mod in layer.modules() if isinstance(mod, nn.Linear)]
        for lin in linears:
            W = lin.weight.data
            if method == "wanda":
                mask = _mask(torch.abs(W.float()) * torch.sqrt(scalers[lin].s.reshape(1, -1)), target, n, m)
            elif method == "magnitude" and m:
                mask = _mask(torch.abs(W.float()), target, n, m)
            elif method == "magnitude":
                metric = torch.abs(W.float())
                mask = metric <= torch.sort(metric.flatten())[0][int(metric.numel() * target)]
            elif method == "ria":
                mask = _mask(_ria_score(W, scalers[lin].s), target, n, m)
            elif method == "sparsegpt":
                new, mask = sparsegpt_prune(W, hessians[lin].H, target, Structure(n, m))
                W.copy_(new)
            if refine == "dsnot":
                mom = moments[lin]
                mask = dsnot_refine(W, mask, mom.sum_mean, mom.var, scalers[lin].s, structure=Structure(n, m))
            W[mask] = 0
            masks[names[lin] + ".weight"] = mask
    return masks
