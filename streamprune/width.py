"""Structured width pruning (`--structure width`): whole MLP intermediate channels removed from every block.

A block's MLP is found from the model's own modules, not from names: the one linear whose input width is the
config's `intermediate_size` consumes the channels (down_proj); the linears beside it whose outputs are that
width, or twice it (a fused gate/up, halves [gate; up]), produce them. Removing channel j drops row j of every
producer (rows j and I + j of a fused one) and column j of the consumer. That correspondence is checked on every
block with the module's own forward: the shrunk MLP must give what the dense MLP gives with those consumer
columns zeroed, on a fixed random probe, or the job stops with one line.

Every block keeps the same number of channels (a multiple of `--width-multiple`), so the output is the stock
architecture with a smaller `intermediate_size`. The default multiple, 256, is what llama.cpp's k-quants need along
each row (a down projection's row is `intermediate_size` long): its quantizer (src/llama-quant.cpp in the
llama.cpp inside the llama-cpp-python source distribution) stores a tensor whose rows are not a multiple of a type's
block in a fallback type, Q4_K -> Q5_0 and Q6_K -> Q8_0 for rows that are a multiple of 32, F16 for rows that are
not; a "smaller" model can then be larger and slower than the dense one. Channel j's score is Wanda's metric summed over its consumer
column: sum_i |W_down[i, j]| * ||x_j|| (x: the consumer's input on the calibration tokens; without data,
sum_i |W_down[i, j]|). Compensation (on by default) then refits the consumer on the kept channels by least
squares from the second moment G = X^T X of its input, gathered in the same dense pass:
W' = argmin ||X W^T - X_S W'^T||^2 + d ||W' - W_S||^2 = W_S + W_R G_RS (G_SS + d I)^-1: a ridge toward the
kept columns as they were, d a fraction of G_SS's mean diagonal (SparseGPT's damping) that grows as calibration
tokens get few against the channels kept: max(0.01, 0.3 x keep / tokens). Measured on SmolLM2-135M at 20% (ppl on
WikiText-2 test): with 16 x 256 tokens the best fraction is about 0.1 (0.01: 38.4, 0.1: 37.1, 1: 37.4; the rule
gives 0.09), with 64 x 512 about 0.01 (35.8; 0.1: 36.0; the rule gives 0.011). No bias is added: the
architecture stays stock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dtypes import exact_cast
from .errors import StreamPruneError
from .layout import fp8_block
from .modelinfo import text_config

PROBE_TOKENS = 16
PROBE_TOLERANCE = 1e-2   # relative L2 difference; a wrong channel correspondence gives about 1
DAMP = 0.01               # the least damping fraction (SparseGPT's)
DAMP_PER_RATIO = 0.3      # x keep / tokens: more damping when the refit has few tokens per unknown


MULTIPLE = 256        # --width-multiple's default: llama.cpp's k-quant block (QK_K) along each row
LEGACY_BLOCK = 32     # llama.cpp's legacy quants' block (Q4_0, Q5_0, Q8_0, ...)


def kept_channels(intermediate: int, ratio: float, multiple: int) -> int:
    """Channels every block keeps: (1 - ratio) x intermediate rounded to a multiple of `multiple`."""
    keep = round(intermediate * (1 - ratio) / multiple) * multiple
    if not 0 < keep < intermediate:
        what = "nothing to remove" if keep >= intermediate else "nothing to keep"
        raise StreamPruneError(f"--structure width --sparsity {ratio}: {intermediate} intermediate channels rounded "
                               f"to a multiple of {multiple} keeps {keep}, {what}; choose another --sparsity"
                               + (" or a smaller --width-multiple (llama.cpp quantizes every row in full only at "
                                  "multiples of 256)" if multiple > 1 else ""))
    return keep


def llama_cpp_warning(width: int) -> str | None:
    """One line when llama.cpp will not quantize a row of `width` (the down projection's) as asked, else None."""
    if width % LEGACY_BLOCK:
        return (f"MLP width {width} is not a multiple of {LEGACY_BLOCK}: llama.cpp stores every down projection "
                f"(ffn_down) in F16 whatever the quantization (--width-multiple {MULTIPLE} avoids it)")
    if width % MULTIPLE:
        return (f"MLP width {width} is not a multiple of {MULTIPLE}: llama.cpp's k-quants (Q4_K_M, Q6_K, ...) "
                f"store every down projection (ffn_down) in a larger legacy type (Q4_K -> Q5_0, Q6_K -> Q8_0); "
                f"--width-multiple {MULTIPLE} avoids it")
    return None


def width_facts(intermediate: int, keep: int, ratio: float, multiple: int) -> dict:
    """What the summary, the plan and the report say about a width job: requested and achieved fractions of the
    MLP channels removed, and the llama.cpp warning (None when every row quantizes as asked)."""
    return {"before": intermediate, "after": keep, "multiple": multiple, "requested": ratio,
            "achieved": round(1 - keep / intermediate, 4), "llama_cpp_warning": llama_cpp_warning(keep)}


def removed_bytes(blocks, intermediate: int, keep: int, itemsize: int) -> int:
    """Bytes the shrunk MLPs no longer hold, over all blocks: each removed channel is a row of every producer (and
    its bias) and a column of the consumer, from the modules themselves (no names)."""
    total = 0
    for block in blocks:
        mlp = find_mlp(block, intermediate)
        down = block.get_submodule(mlp.consumer)
        per_channel = down.out_features
        for name, copies in mlp.producers:
            lin = block.get_submodule(name)
            per_channel += copies * (lin.in_features + (lin.bias is not None))
        total += (intermediate - keep) * per_channel * itemsize
    return total


@dataclass
class MLP:
    """One block's MLP: the consumer (its input is the channels) and the producers (their outputs are)."""
    module: nn.Module
    consumer: str                      # local names inside the block
    producers: list[tuple[str, int]]   # (name, copies): out_features == copies x intermediate


def find_mlp(block: nn.Module, intermediate: int) -> MLP:
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    consumers = [n for n, m in linears.items() if m.in_features == intermediate]
    if len(consumers) != 1:
        raise StreamPruneError(f"--structure width: a block has {len(consumers)} linears taking intermediate_size "
                               f"({intermediate}) inputs; it needs exactly one (the MLP's down projection)")
    consumer = consumers[0]
    parent = consumer.rsplit(".", 1)[0] if "." in consumer else ""
    producers = [(n, m.out_features // intermediate) for n, m in linears.items()
                 if n != consumer and (n.rsplit(".", 1)[0] if "." in n else "") == parent
                 and m.out_features in (intermediate, 2 * intermediate)]
    if not producers:
        raise StreamPruneError(f"--structure width: no linear beside {consumer} produces its {intermediate} inputs")
    return MLP(block.get_submodule(parent), consumer, producers)


def check_model(blocks, config) -> int:
    """The intermediate size every block's MLP has (refusing what width pruning cannot shrink to a stock config)."""
    from .targets import experts_modules

    intermediate = getattr(text_config(config), "intermediate_size", None)
    if not isinstance(intermediate, int):
        raise StreamPruneError(f"--structure width needs one integer intermediate_size in the config (found "
                               f"{intermediate!r})")
    for block in blocks:
        if experts_modules(block):
            raise StreamPruneError("--structure width shrinks dense MLPs; this model's blocks hold Mixture-of-Experts "
                                   "weights (removing expert channels is not built)")
        find_mlp(block, intermediate)
    return intermediate


class WidthPruner:
    """What the block loop calls for `--structure width`: the statistics it needs per linear, and the shrinking
    of one block's MLP in place."""
    updates_weights = True

    def __init__(self, intermediate: int, keep: int, needs_data: bool, compensate: bool):
        self.intermediate, self.keep = intermediate, keep
        self.needs_data, self.compensate = needs_data, compensate and needs_data
        self.needs = frozenset({"sq_norm"} | ({"hessian"} if self.compensate else set())) if needs_data else frozenset()

    def prune_work(self, out: int, inp: int, structure, sparsity: float):
        """For the time estimate: the consumer's refit (a Cholesky solve of the kept channels, about
        intermediate^3 / 3, and W_R G_RS) and the channel scores; the producers are only sliced."""
        from .methods.base import Work

        if inp != self.intermediate:
            return Work(steps=5)
        return Work(flops=(inp ** 3 / 3 + 2 * out * inp * inp) if self.compensate else 0, selections=out * inp,
                    steps=50)

    def hessian_widths(self) -> tuple:
        """For the planner: G (intermediate^2 float32), its kept block and that block's Cholesky factor."""
        return (self.intermediate,) * 3 if self.compensate else ()

    def needs_of(self, block: nn.Module):
        """Statistics only for the consumer's input (its squared norms, and G when compensating)."""
        consumer = find_mlp(block, self.intermediate).consumer + ".weight"
        return lambda t: self.needs if t.name == consumer else frozenset()

    @torch.no_grad()
    def prune_block(self, block: nn.Module, stats, i: int) -> dict:
        """Remove the block's lowest-scoring channels; returns {linear: {"zeros": removed, "numel": before}}."""
        mlp = find_mlp(block, self.intermediate)
        down = block.get_submodule(mlp.consumer)
        w = down.weight
        st = stats.stats[(mlp.consumer + ".weight", None)] if stats is not None else None
        score = w.float().abs().sum(0)
        if st is not None:
            score = score * st.sq_norm.sqrt()
        # the `keep` highest scores; ties keep the lower index (a stable sort of the negated scores)
        kept = torch.sort(torch.sort(-score, stable=True).indices[: self.keep]).values
        removed = torch.ones(self.intermediate, dtype=torch.bool, device=w.device)
        removed[kept] = False
        new_down = compensated(w, st.hessian.H, kept, removed, damping(self.keep, st.tokens)) \
            if self.compensate else None
        before = {name: block.get_submodule(name).weight.numel() for name, _ in mlp.producers} | {mlp.consumer: w.numel()}
        probe_check(mlp, block, kept, removed, i)
        if new_down is not None:
            down.weight = nn.Parameter(new_down.to(w.dtype), requires_grad=False)
            if not bool(torch.isfinite(down.weight).all()):
                raise StreamPruneError(f"block {i} {mlp.consumer}: the compensated weights are not finite; rerun with "
                                       f"--no-width-compensation")
        return {name: {"zeros": n - block.get_submodule(name).weight.numel(), "numel": n} for name, n in before.items()}


def damping(keep: int, tokens: int) -> float:
    """The ridge strength, as a fraction of G_SS's mean diagonal (module docstring)."""
    return max(DAMP, DAMP_PER_RATIO * keep / max(tokens, 1))


def compensated(w: torch.Tensor, H: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor,
                fraction: float) -> torch.Tensor:
    """W_S + W_R G_RS (G_SS + d I)^-1 in float32 (the least-squares refit of the consumer on the kept inputs)."""
    W = w.float()
    Gss = H[kept][:, kept]
    Grs = H[removed][:, kept]
    damp = fraction * Gss.diagonal().mean()
    if not bool(damp > 0):  # no calibration token ever reached these channels: nothing to refit from
        return W[:, kept]
    Gss.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(Gss)
    while int(info):  # numerically singular: more damping, as SparseGPT does
        damp = damp * 10
        Gss.diagonal().add_(damp * 0.9)
        L, info = torch.linalg.cholesky_ex(Gss)
    return W[:, kept] + torch.cholesky_solve((W[:, removed] @ Grs).t(), L).t()


def probe_check(mlp: MLP, block: nn.Module, kept: torch.Tensor, removed: torch.Tensor, i: int) -> None:
    """Shrink the producers and the consumer in place, and prove on a fixed probe that the channels dropped are
    the ones whose consumer columns were zeroed: the model's own MLP forward, before and after."""
    down = block.get_submodule(mlp.consumer)
    hidden = down.out_features
    gen = torch.Generator().manual_seed(i)
    probe = torch.randn(1, PROBE_TOKENS, hidden, generator=gen).to(down.weight.device, down.weight.dtype)
    down.weight[:, removed] = 0
    try:
        dense = mlp.module(probe)
    except Exception as e:
        raise StreamPruneError(f"--structure width: block {i}'s MLP ({type(mlp.module).__name__}) cannot be called "
                               f"on its hidden states alone ({type(e).__name__}: {e})") from None
    for name, copies in mlp.producers:
        lin = block.get_submodule(name)
        rows = torch.cat([kept + c * removed.numel() for c in range(copies)])
        lin.weight = nn.Parameter(lin.weight[rows].contiguous(), requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias[rows].contiguous(), requires_grad=False)
        lin.out_features = lin.weight.shape[0]
    down.weight = nn.Parameter(down.weight[:, kept].contiguous(), requires_grad=False)
    down.in_features = down.weight.shape[1]
    shrunk = mlp.module(probe)
    err = float((shrunk.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-30))
    if not err <= PROBE_TOLERANCE:
        raise StreamPruneError(f"--structure width: block {i}'s MLP ({type(mlp.module).__name__}) does not pair "
                               f"its producers' outputs with {mlp.consumer}'s inputs channel by channel (relative "
                               f"difference {err:.2g} on a probe); this architecture cannot be shrunk")


def shrink_config(path: Path, intermediate: int, keep: int) -> bytes:
    """config.json with the text model's `intermediate_size` (top level, or `text_config`'s) set to `keep`; other
    nested configs (a vision tower's) are left alone even where their value happens to be the same."""
    raw = json.loads(Path(path).read_text())
    text = raw if "intermediate_size" in raw else raw.get("text_config")
    if not isinstance(text, dict) or text.get("intermediate_size") != intermediate:
        raise StreamPruneError(f"{path}: no intermediate_size {intermediate} to update")
    text["intermediate_size"] = keep
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()


def width_pruner(info, options, dtype: torch.dtype, ckpt_dtype: torch.dtype) -> "WidthPruner":
    """`--structure width`: the channel count every block keeps, from the config (shapes are checked against the
    model's modules later, in check_model): every refusal of the width strategy before any work."""
    if fp8_block(info.config):
        raise StreamPruneError("--structure width on an FP8 checkpoint is not built (its scale tiles would no longer "
                               "line up with the remaining channels)")
    if not exact_cast(ckpt_dtype, dtype):
        raise StreamPruneError(f"--structure width writes the kept weights from the compute dtype: --dtype "
                               f"{str(dtype)[6:]} cannot hold the {str(ckpt_dtype)[6:]} checkpoint exactly; use "
                               f"--dtype float32")
    intermediate = getattr(info.text, "intermediate_size", None)
    if not isinstance(intermediate, int):
        raise StreamPruneError(f"--structure width needs one integer intermediate_size in the config (found "
                               f"{intermediate!r})")
    keep = kept_channels(intermediate, options.sparsity, options.width_multiple)
    return WidthPruner(intermediate, keep, needs_data=options.method != "magnitude",
                       compensate=options.width_compensation)
