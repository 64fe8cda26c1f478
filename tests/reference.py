"""An in-memory reference, written from the paper (Sun et al. 2023): whole model in memory, batch 1, float32.

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
    return model.base_model.layers  # `model.layers` of most families, `gpt_neox.layers` of GPT-NeoX


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
    from streamprune.methods.admm import admm_prune
    from streamprune.methods.sparsegpt import sparsegpt_prune
    from streamprune.methods import Structure
    from streamprune.statistics import ChannelMoments, HessianStats

    masks, names = {}, {mod: name for name, mod in model.named_modules()}
    layers = decoder_layers(model)
    targets = [sparsity] * len(layers)
    if profile in ("owl", "owl-linear"):  # the dense sweep: every block's statistics from the still dense model
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
            out = [scalers.setdefault(lin, _Scaler(lin))]  # (also what owl-linear's within-block rule reads)
            if refine == "dsnot":
                out.append(_hook(moments.setdefault(lin, ChannelMoments(lin.in_features))))
            if method in ("sparsegpt", "admm"):
                out.append(_hook(hessians.setdefault(lin, HessianStats(lin.in_features))))
            return out

        linears = _collect(model, layer, ids, hooks, batch_size) if method != "magnitude" else \
            [mod for mod in layer.modules() if isinstance(mod, nn.Linear)]
        per = {lin: target for lin in linears}
        if profile == "owl-linear":  # each linear's own outlier share, spread around the block's target
            from streamprune.methods.owl import spread_weighted
            ratios = [owl_outlier_ratio([(lin.weight, scalers[lin].s)], hyper_m=owl_m) for lin in linears]
            per = dict(zip(linears, spread_weighted(ratios, [lin.weight.numel() for lin in linears], target,
                                                    owl_lambda)))
        for lin in linears:
            W, target = lin.weight.data, per[lin]
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
            elif method == "admm":
                new, mask = admm_prune(W, hessians[lin].H, target, Structure(n, m))
                W.copy_(new)
            if refine == "dsnot":
                mom = moments[lin]
                mask = dsnot_refine(W, mask, mom.sum_mean, mom.var, scalers[lin].s, structure=Structure(n, m))
            W[mask] = 0
            masks[names[lin] + ".weight"] = mask
    return masks


# ------------------------------------------------------------------------------------------ Mixture of Experts

def _experts_modules(layer):
    return [m for m in layer.modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))]


def _gates(layer) -> set:
    """Linears that gate a MoE block with one score per expert or one scalar: routing, never pruned."""
    out = set()
    for mod in layer.modules():
        experts = [c for c in mod.children() if c in _experts_modules(layer)]
        if experts:
            count = next(p.shape[0] for p in experts[0].parameters(recurse=False) if p.dim() == 3)
            out |= {c for c in mod.children() if isinstance(c, nn.Linear) and c.out_features in (count, 1)}
    return out


def _expert_matmul(experts, weight, e, x, bias=None):
    y = x @ weight[e] if experts.is_transposed else torch.nn.functional.linear(x, weight[e])
    return y + bias[e] if bias is not None else y


class _ExpertRows(torch.overrides.TorchFunctionMode):
    """Experts modules that are not a gate_up_proj/down_proj pair (JetMoE's parallel experts): every product of an
    input with expert e's slice of a 3-D parameter, as the model's own code computes it, adds those rows to e's
    statistics (`rows[(module, parameter name, e)]`)."""

    def __init__(self, params: dict):
        super().__init__()
        self.params, self.rows = params, {}  # id(3-D parameter) -> (module, name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            w = args[1]
            base = getattr(w, "_base", None)
            if base is not None and id(base) in self.params:
                e = (w.storage_offset() - base.storage_offset()) // base.stride(0)
                self.rows.setdefault((*self.params[id(base)], e), []).append(args[0])
        return func(*args, **kwargs)


@torch.no_grad()
def reference_prune_moe(model, ids: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                        routers: tuple = ()) -> dict:
    """Wanda on MoE blocks, written out on transformers' own model (eager experts, batch 1): every linear
    of a block except routing gates (and the linears named in `routers`, module names inside a layer) as usual;
    each expert's matrices with the statistics of the rows the model's router sends it (the gate/up input: those
    tokens' hidden states; the down input: the expert's own gated activations of them), a sequence that sends it
    no token still counting. Returns {name: mask}."""
    masks, names = {}, {mod: name for name, mod in model.named_modules()}
    for layer in decoder_layers(model):
        gates = _gates(layer) | {layer.get_submodule(r) for r in routers}
        linears = [mod for mod in layer.modules() if isinstance(mod, nn.Linear) and mod not in gates]
        scalers = {lin: _Scaler(lin) for lin in linears}
        experts_mods = _experts_modules(layer)
        per_expert = {}  # (module, parameter name, e) -> [s, n]
        for ex in experts_mods:
            for pname, p in ex.named_parameters(recurse=False):
                if p.dim() == 3:
                    width = p.shape[1] if getattr(ex, "is_transposed", False) else p.shape[2]
                    for e in range(p.shape[0]):
                        per_expert[(ex, pname, e)] = [torch.zeros(width), 0]

        generic = {id(p): (ex, pname) for ex in experts_mods if not hasattr(ex, "gate_up_proj")
                   for pname, p in ex.named_parameters(recurse=False) if p.dim() == 3}

        def experts_hook(ex, args, kwargs):
            if not hasattr(ex, "gate_up_proj"):
                return
            h, idx = args[0], args[1] if len(args) > 1 else kwargs.get("router_indices", kwargs.get("top_k_index"))
            gu, down = ex.gate_up_proj, ex.down_proj
            gu_b, down_b = getattr(ex, "gate_up_proj_bias", None), getattr(ex, "down_proj_bias", None)
            for e in range(gu.shape[0]):
                x = h[(idx == e).any(-1)]
                inner = ex._apply_gate(_expert_matmul(ex, gu, e, x, gu_b))
                for pname, rows in (("gate_up_proj", x), ("down_proj", inner)):
                    acc = per_expert[(ex, pname, e)]
                    acc[0] *= acc[1] / (acc[1] + 1)
                    acc[1] += 1
                    acc[0] += torch.norm(rows.t().float(), p=2, dim=1) ** 2 / acc[1]

        handles = [lin.register_forward_hook(scalers[lin]) for lin in linears]
        handles += [ex.register_forward_pre_hook(experts_hook, with_kwargs=True) for ex in experts_mods]
        handles.append(layer.register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop())))
        for s in range(ids.shape[0]):
            watch = _ExpertRows(generic)
            try:
                with watch:
                    model(input_ids=ids[s:s + 1], use_cache=False)
            except _Stop:
                pass
            for key, acc in per_expert.items():
                if key[0] in {g[0] for g in generic.values()}:
                    rows = watch.rows.get(key, [])
                    x = torch.cat(rows) if rows else torch.zeros(0, acc[0].shape[0])
                    acc[0] *= acc[1] / (acc[1] + 1)
                    acc[1] += 1
                    acc[0] += torch.norm(x.t().float(), p=2, dim=1) ** 2 / acc[1]
        for h in handles:
            h.remove()
        for lin in linears:
            W = lin.weight.data
            mask = _mask(W.float().abs() * torch.sqrt(scalers[lin].s.reshape(1, -1)), sparsity, n, m)
            W[mask] = 0
            masks[names[lin] + ".weight"] = mask
        for (ex, pname, e), (s, _) in per_expert.items():
            p = getattr(ex, pname).data
            W = p[e].t() if getattr(ex, "is_transposed", False) else p[e]
            mask = _mask(W.float().abs() * torch.sqrt(s.reshape(1, -1)), sparsity, n, m)
            W[mask] = 0
            masks[f"{names[ex]}.{pname}[{e}]"] = mask
    return masks


# ------------------------------------------------------------------------------------------ structured width

def _mlp_linears(layer):
    """(producers as (linear, copies), consumer) of a stock MLP: gate/up (or Phi-3's fused gate_up) and down."""
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj"):
        return [(mlp.gate_up_proj, 2)], mlp.down_proj
    return [(mlp.gate_proj, 1), (mlp.up_proj, 1)], mlp.down_proj


@torch.no_grad()
def reference_width(model, ids: torch.Tensor, ratio: float, multiple: int = 8, compensate: bool = True,
                    damp: float = 0.01, damp_per_ratio: float = 0.3):
    """Shrink every MLP of `model` in place to the same number of channels (docs/edge.md, --structure width).

    Channel j's score: sum_i |W_down[i, j]| x ||x_j|| (x: down's input over the calibration tokens, through the
    already shrunk blocks before it; Wanda's float32 scaler); the highest `keep` stay (ties: the lower index).
    Compensation solves the documented ridge problem directly in float64 with least squares:
    min ||X W^T - X_S W'^T||^2 + lam ||W' - W_S||^2, lam = max(damp, damp_per_ratio x keep / tokens) x
    mean(diag(X_S^T X_S))."""
    layers = decoder_layers(model)
    inter = model.config.get_text_config().intermediate_size
    keep = round(inter * (1 - ratio) / multiple) * multiple
    for layer in layers:
        producers, down = _mlp_linears(layer)
        rows, scaler = [], _Scaler(down)
        hooks = lambda lin: [scaler, lambda m, a, o: rows.append(a[0].reshape(-1, inter).double())] \
            if lin is down else []
        _collect(model, layer, ids, hooks)
        W = down.weight.data
        score = W.float().abs().sum(0) * torch.sqrt(scaler.s)
        kept = torch.sort(torch.sort(-score, stable=True).indices[:keep]).values
        if compensate:
            X = torch.cat(rows)
            Xs = X[:, kept]
            lam = max(damp, damp_per_ratio * keep / X.shape[0]) * (Xs * Xs).sum(0).mean()
            A = torch.cat([Xs, lam.sqrt() * torch.eye(keep, dtype=torch.float64)])
            B = torch.cat([X @ W.double().t(), lam.sqrt() * W.double()[:, kept].t()])
            new = torch.linalg.lstsq(A, B).solution.t()
        else:
            new = W[:, kept]
        for lin, copies in producers:
            sel = torch.cat([kept + c * inter for c in range(copies)])
            lin.weight = nn.Parameter(lin.weight.data[sel].clone())
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.data[sel].clone())
            lin.out_features = lin.weight.shape[0]
        down.weight = nn.Parameter(new.to(W.dtype).contiguous())
        down.in_features = keep
    model.config.get_text_config().intermediate_size = keep
    return model
