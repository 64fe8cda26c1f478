"""An in-memory reference Wanda, written from wanda-spec.md: whole model in memory, batch 1, float32.

Deliberately independent of streamprune's machinery: block i's statistics come from full-model forwards in
which blocks 0..i-1 are already pruned in place (hooks on block i's linears, a stop right after block i).
"""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def reference_prune(model, ids: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    method: str = "wanda") -> dict[str, torch.Tensor]:
    """Prune `model` in place; return {parameter name: bool mask of zeroed weights}."""
    masks = {}
    names = {mod: name for name, mod in model.named_modules()}
    for layer in decoder_layers(model):
        linears = [mod for mod in layer.modules() if isinstance(mod, nn.Linear)]
        scaler = {lin: torch.zeros(lin.in_features, dtype=torch.float32) for lin in linears}
        count = {lin: 0 for lin in linears}

        def stat_hook(lin, args, output):
            inp = args[0]
            if inp.dim() == 2:
                inp = inp.unsqueeze(0)
            tmp = inp.shape[0]
            inp = inp.reshape(-1, inp.shape[-1]).t()
            scaler[lin] *= count[lin] / (count[lin] + tmp)
            count[lin] += tmp
            inp = inp.type(torch.float32)
            scaler[lin] += torch.norm(inp, p=2, dim=1) ** 2 / count[lin]

        def stop(mod, args, output):
            raise _Stop

        if method == "wanda":
            handles = [lin.register_forward_hook(stat_hook) for lin in linears] + [layer.register_forward_hook(stop)]
            for s in range(ids.shape[0]):
                try:
                    model(input_ids=ids[s:s + 1], use_cache=False)
                except _Stop:
                    pass
            for h in handles:
                h.remove()

        for lin in linears:
            W = lin.weight.data
            if method == "wanda":
                metric = torch.abs(W.float()) * torch.sqrt(scaler[lin].reshape(1, -1))
            else:
                metric = torch.abs(W.float())
            mask = torch.zeros_like(metric, dtype=torch.bool)
            if m:
                for ii in range(metric.shape[1]):
                    if ii % m == 0:
                        tmp = metric[:, ii:ii + m].float()
                        mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            elif method == "wanda":
                sort_res = torch.sort(metric, dim=-1, stable=True)
                indices = sort_res[1][:, :int(metric.shape[1] * sparsity)]
                mask.scatter_(1, indices, True)
            else:
                thresh = torch.sort(metric.flatten())[0][int(metric.numel() * sparsity)]
                mask = metric <= thresh
            W[mask] = 0
            masks[names[lin] + ".weight"] = mask
    return masks
