"""Sparsity of a checkpoint's decoder-block linears, streamed from its shards one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import StreamPruneError
from .model import build_skeleton, find_blocks
from .shards import Checkpoint
from .spec import ModelInfo

CHUNK = 1 << 24  # elements compared at a time, so a huge weight never needs a same-sized bool tensor


def _zeros(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    return sum(int((flat[k:k + CHUNK] == 0).sum()) for k in range(0, flat.numel(), CHUNK))


def block_linear_weights(model_dir: Path) -> list[dict[str, str]]:
    """Per decoder block, {linear name inside the block: checkpoint tensor name of its weight}."""
    config = ModelInfo.load(model_dir).config
    skeleton = build_skeleton(config)
    prefix, blocks = find_blocks(skeleton, config)
    return [{name: f"{prefix}.{i}.{name}.weight" for name, m in block.named_modules() if isinstance(m, nn.Linear)}
            for i, block in enumerate(blocks)]


def report(out_dir: str | os.PathLike, png: str | os.PathLike | None = None) -> dict:
    """Fraction of exact zeros per linear, per block and overall, of the 2-D block-linear weights in `out_dir`.

    Returns {"model", "blocks": [{"index", "sparsity", "linears": {name: sparsity}}], "overall"}; block and
    overall figures are weighted by element count. With `png`, also draws a bar chart and heat map there.
    """
    out_dir = Path(out_dir)
    if png is not None:
        _matplotlib()  # fail before reading anything
    if not out_dir.is_dir():
        raise StreamPruneError(f"{out_dir}: no such model directory")
    ckpt = Checkpoint(out_dir)
    blocks, total_zeros, total = [], 0, 0
    for i, weights in enumerate(block_linear_weights(out_dir)):
        linears, zeros, numel = {}, 0, 0
        for name, tensor in weights.items():
            info = ckpt.tensors.get(tensor)
            if info is None:
                raise StreamPruneError(f"{out_dir}: tensor {tensor} is missing from the checkpoint")
            if len(info.shape) != 2:
                continue
            z, n = _zeros(ckpt.read(tensor)), info.shape[0] * info.shape[1]
            linears[name] = z / n
            zeros, numel = zeros + z, numel + n
        blocks.append({"index": i, "sparsity": zeros / numel if numel else 0.0, "linears": linears})
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
    """A table: one row per block (its sparsity, then each linear's), then the overall figure."""
    names = _columns(d)
    headers = ["block", "all"] + _short(names)
    widths = [max(len(h), 6) for h in headers]
    rows = [[str(b["index"]), f"{b['sparsity']:.4f}"]
            + [f"{b['linears'][n]:.4f}" if n in b["linears"] else "-" for n in names] for b in d["blocks"]]
    lines = [f"sparsity of decoder-block linears in {d['model']}",
             "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
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
