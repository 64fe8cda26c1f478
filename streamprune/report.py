"""Sparsity of a checkpoint's pruned weights (linears and experts), read from its shards one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import StreamPruneError
from .model import StreamedModel, targets
from .shards import Checkpoint
from .spec import ModelInfo

CHUNK = 1 << 24  # elements compared at a time, so a huge weight never needs a same-sized bool tensor


def _zero(t: torch.Tensor) -> torch.Tensor:
    """Where `t` is +0 or -0 (FP8 codes compared by their bits: eq is not defined for float8 on every device)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (t.view(torch.uint8) & 0x7F) == 0
    return t == 0


def matrix_zeros(t: torch.Tensor) -> tuple[int, bool]:
    """Zeros of an [out, in] matrix, and whether every group of 4 along its input dimension holds at least 2
    (2:4 sparsity as sparse kernels read it; False when the input width is not a multiple of 4)."""
    zeros, nm = 0, t.shape[-1] % 4 == 0
    rows = max(1, CHUNK // max(1, t.shape[-1]))
    for k in range(0, t.shape[0], rows):
        z = _zero(t[k:k + rows])
        zeros += int(z.sum())
        if nm:
            nm = bool((z.reshape(-1, 4).sum(1) >= 2).all())
    return zeros, nm


def report(out_dir: str | os.PathLike, png: str | os.PathLike | None = None) -> dict:
    """Fraction of exact zeros of every pruned weight (each linear, and each Mixture-of-Experts parameter over all
    its experts), per block and overall, read from the shards of `out_dir` through the checkpoint's own layout
    (experts stored one by one or fused, FP8 codes).

    Returns {"model", "blocks": [{"index", "sparsity", "linears": {name: sparsity}, "nm_2_4": {name: bool},
    "experts": {name: [sparsity of each expert]}}], "overall"}; block and overall figures are weighted by element
    count. `nm_2_4` says whether every matrix of the weight (every expert's) satisfies 2:4 along its input
    dimension. With `png`, also draws a bar chart and heat map there.
    """
    out_dir = Path(out_dir)
    if png is not None:
        _matplotlib()  # fail before reading anything
    if not out_dir.is_dir():
        raise StreamPruneError(f"{out_dir}: no such model directory")
    ckpt = Checkpoint(out_dir)
    model = StreamedModel(ModelInfo.load(out_dir).config, ckpt, "cpu", torch.float32)
    model.check()
    blocks, total_zeros, total = [], 0, 0
    for i, block in enumerate(model.blocks):
        entry = {"index": i, "sparsity": 0.0, "linears": {}, "nm_2_4": {}, "experts": {}}
        zeros = numel = 0
        for t in targets(block):
            count = t.experts or 1
            per = [[0, 0] for _ in range(count)]   # zeros and elements of each expert's matrix
            nm = True
            for piece in model.layout.pieces[model.block_prefix(i) + t.name]:
                value = ckpt.read(piece.name)
                mats = ([(piece.expert, value)] if piece.expert is not None or t.experts is None else
                        list(enumerate(value)))   # a fused tensor: one matrix per expert along dim 0
                for e, m in mats:
                    z, ok = matrix_zeros(m.t() if t.transposed else m)   # [in, out] experts (gpt-oss) turned to [out, in]
                    per[e or 0][0] += z
                    per[e or 0][1] += m.numel()
                    nm = nm and ok
                del value
            z, n = sum(p[0] for p in per), sum(p[1] for p in per)
            entry["linears"][t.label] = z / n
            entry["nm_2_4"][t.label] = nm
            if t.experts:
                entry["experts"][t.label] = [a / b for a, b in per]
            zeros, numel = zeros + z, numel + n
        entry["sparsity"] = zeros / numel if numel else 0.0
        blocks.append(entry)
        total_zeros, total = total_zeros + zeros, total + numel
    result = {"model": str(out_dir), "blocks": blocks, "overall": total_zeros / total if total else 0.0}
    if png is not None:
        plot(result, png)
    return result


def _columns(d: dict) -> list[str]:
    """Every linear name, in order of first appearance across blocks."""
    return list(dict.fromkeys(name for b in d["blocks"] for name in b["linears"]))


def _short(names: list[str]) -> list[str]:
    """Column headers: the last name component (q_proj, down_proj, ...) when that is unambiguous."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return last if len(set(last)) == len(last) else names


def format_report(d: dict) -> str:
    """A table: one row per block (its sparsity, then each weight's), the experts' spread, how many weights are
    2:4, then the overall figure."""
    names = _columns(d)
    headers = ["block", "all"] + _short(names)
    widths = [max(len(h), 6) for h in headers]
    rows = [[str(b["index"]), f"{b['sparsity']:.4f}"]
            + [f"{b['linears'][n]:.4f}" if n in b["linears"] else "-" for n in names] for b in d["blocks"]]
    lines = [f"sparsity of decoder-block weights in {d['model']}",
             "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    spread = [s for b in d["blocks"] for per in b.get("experts", {}).values() for s in per]
    if spread:
        lines.append(f"experts: {len(spread)} matrices, sparsity {min(spread):.4f} to {max(spread):.4f}")
    flags = [ok for b in d["blocks"] for ok in b.get("nm_2_4", {}).values()]
    lines.append(f"2:4 along the input dimension: {sum(flags)} of {len(flags)} weights")
    lines.append(f"overall {d['overall']:.4f}")
    return "\n".join(lines)


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StreamPruneError("a sparsity plot needs matplotlib: pip install matplotlib "
                               "(or pip install 'streamprune[plot]')") from None
    return Figure


def plot(d: dict, png: str | os.PathLike) -> None:
    """Per-block sparsity as bars above a linear x block heat map, saved as a PNG."""
    Figure = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    names = _columns(d)
    n = len(d["blocks"])
    grid = torch.full((len(names), n), float("nan"))
    for j, b in enumerate(d["blocks"]):
        for k, name in enumerate(names):
            if name in b["linears"]:
                grid[k, j] = b["linears"][name]
    fig = Figure(figsize=(max(6.0, 0.25 * n + 3), 2.5 + 0.35 * len(names)), layout="constrained")
    bars, heat = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(1, len(names) // 3)])
    bars.bar(range(n), [b["sparsity"] for b in d["blocks"]], color="tab:blue")
    bars.set_ylim(0, 1)
    bars.set_ylabel("sparsity")
    bars.set_title(f"sparsity per decoder block (overall {d['overall']:.4f})")
    image = heat.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    heat.set_yticks(range(len(names)), _short(names))
    heat.set_xlabel("block")
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=heat, label="sparsity")
    fig.savefig(png, dpi=100)
