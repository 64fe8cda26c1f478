"""Sparsity of a checkpoint's pruned weights (linears and experts), read from its shards one tensor at a time."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import StreamPruneError
from .model import StreamedModel, is_zero as _zero
from .targets import targets
from .shards import Checkpoint
from .modelinfo import ModelInfo
from .state import JobDir

CHUNK = 1 << 24  # elements compared at a time, so a huge weight never needs a same-sized bool tensor


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

    Returns {"model", "pruning", "blocks": [{"index", "sparsity", "linears": {name: sparsity}, "nm_2_4": {name:
    bool}, "experts": {name: [sparsity of each expert]}}], "overall"}; block and overall figures are weighted by
    element count. `nm_2_4` says whether every matrix of the weight (every expert's) satisfies 2:4 along its input
    dimension. `pruning` says what kind of pruning the checkpoint holds (`pruning_kind`). A `--structure width`
    output also has "width" (`width_report`: intermediate size per block, parameters and bytes before and after).
    With `png`, also draws a bar chart and heat map there (for width, the MLP width per block).
    """
    out_dir = Path(out_dir)
    if png is not None:
        _matplotlib()  # fail before reading anything
    if not out_dir.is_dir():
        raise StreamPruneError(f"{out_dir}: no such model directory")
    unfinished = JobDir(out_dir).unfinished()
    if unfinished:
        raise StreamPruneError(unfinished)
    ckpt = Checkpoint(out_dir)
    info = ModelInfo.load(out_dir)
    model = StreamedModel(info.config, ckpt, "cpu", torch.float32)
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
    state = _job_state(out_dir)
    result["pruning"] = pruning_kind(state, result)
    if result["pruning"]["kind"] == "width":
        result["width"] = width_report(model, ckpt, state, info.text.intermediate_size)
    if png is not None:
        plot(result, png)
    return result


def _job_state(out_dir: Path):
    """The job state streamprune left in a checkpoint it wrote, or None (none there, or unreadable)."""
    from .state import JobDir

    jobdir = JobDir(out_dir)
    if not jobdir.exists():
        return None
    try:
        return jobdir.load()
    except StreamPruneError:
        return None


def pruning_kind(state, d: dict) -> dict:
    """What pruning the checkpoint holds: from its job state where streamprune left one; otherwise inferred from
    the zeros, saying so (a width-pruned checkpoint without its state looks dense: that is said too).
    {"kind": unstructured | N:M | width | none | unknown, "structure", "method", "target_sparsity", "source"}."""
    if state is not None:
        o = state.fingerprint.get("options", {})
        structure = str(o.get("structure", "unstructured"))
        kind = "width" if structure == "width" else "N:M" if ":" in structure else "unstructured"
        return {"kind": kind, "structure": structure, "method": o.get("method"), "target_sparsity": o.get("sparsity"),
                "sparsity_profile": o.get("sparsity_profile"), "complete": state.complete, "source": "job state"}
    flags = [ok for b in d["blocks"] for ok in b["nm_2_4"].values()]
    inferred = {"structure": None, "method": None, "target_sparsity": None, "source": "inferred from the weights, no "
                "streamprune job state here"}
    if d["overall"] == 0:
        return dict(inferred, kind="unknown", note="no zeros in the block weights: dense, or pruned by width "
                                                    "(removed channels leave no trace without the job state)")
    if flags and all(flags):
        return dict(inferred, kind="N:M", structure="2:4", note="every weight is 2:4 along its input dimension")
    return dict(inferred, kind="unstructured", note="zeros without a 2:4 pattern (an N:M pattern with M other than "
                                                     "4 would read the same)")


def width_report(model: StreamedModel, ckpt: Checkpoint, state, after_size: int) -> dict:
    """A `--structure width` output: every block's MLP intermediate size before (from the job state: the consumer's
    elements before, over its rows) and after (the stored consumer's columns), and the parameters and bytes of
    the whole checkpoint after (its files) and before (plus the removed rows and columns, biases included)."""
    from .width import find_mlp, llama_cpp_warning

    stored = lambda name: [ckpt.tensors[p.name] for p in model.layout.pieces[name]]  # noqa: E731
    blocks, removed, removed_bytes = [], 0, 0
    for i, block in enumerate(model.blocks):
        mlp = find_mlp(block, after_size)
        prefix = model.block_prefix(i)
        down, = stored(prefix + mlp.consumer + ".weight")
        record = state.blocks.get(i)
        after = down.shape[1]
        before = record.linears[mlp.consumer]["numel"] // down.shape[0] if record else None
        if record:
            for name, change in record.linears.items():
                removed += change["zeros"]
                removed_bytes += change["zeros"] * down.dtype.itemsize
            for name, copies in mlp.producers:  # a producer's bias loses the same rows
                bias = prefix + name + ".bias"
                if bias in model.layout.pieces:
                    t, = stored(bias)
                    removed += copies * (before - after)
                    removed_bytes += copies * (before - after) * t.dtype.itemsize
        blocks.append({"index": i, "before": before, "after": after})
    params = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    nbytes = sum(t.nbytes for t in ckpt.tensors.values())
    befores = {b["before"] for b in blocks}
    before = befores.pop() if len(befores) == 1 else None
    options = state.fingerprint.get("options", {})
    return {"intermediate_size": {"before": before, "after": after_size},
            "blocks": blocks, "parameters": {"before": params + removed, "after": params},
            "bytes": {"before": nbytes + removed_bytes, "after": nbytes},
            "channels_removed": {"requested": options.get("sparsity"), "multiple": options.get("width_multiple"),
                                 "achieved": round(1 - after_size / before, 4) if before else None},
            "llama_cpp_warning": llama_cpp_warning(after_size)}


def _pruning_line(p: dict) -> str:
    if p["source"] == "job state":
        what = {"width": "width (whole MLP channels removed)", "N:M": f"N:M {p['structure']}",
                "unstructured": "unstructured"}[p["kind"]]
        extra = "" if p.get("sparsity_profile") in (None, "uniform") else f", profile {p['sparsity_profile']}"
        return (f"pruning: {what}, method {p['method']}, target {'width reduction' if p['kind'] == 'width' else 'sparsity'} "
                f"{p['target_sparsity']}{extra} (from the job state" + ("" if p["complete"] else "; job not complete")
                + ")")
    what = {"unknown": "unknown", "N:M": "N:M 2:4", "unstructured": "unstructured"}[p["kind"]]
    return f"pruning: {what} ({p['source']}; {p['note']})"


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
    if "width" in d:
        return _format_width(d)
    names = _columns(d)
    headers = ["block", "all"] + _short(names)
    widths = [max(len(h), 6) for h in headers]
    rows = [[str(b["index"]), f"{b['sparsity']:.4f}"]
            + [f"{b['linears'][n]:.4f}" if n in b["linears"] else "-" for n in names] for b in d["blocks"]]
    lines = [f"sparsity of decoder-block weights in {d['model']}", _pruning_line(d["pruning"]),
             "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    spread = [s for b in d["blocks"] for per in b.get("experts", {}).values() for s in per]
    if spread:
        lines.append(f"experts: {len(spread)} matrices, sparsity {min(spread):.4f} to {max(spread):.4f}")
    flags = [ok for b in d["blocks"] for ok in b.get("nm_2_4", {}).values()]
    lines.append(f"2:4 along the input dimension: {sum(flags)} of {len(flags)} weights")
    lines.append(f"overall {d['overall']:.4f}")
    return "\n".join(lines)


def _format_width(d: dict) -> str:
    """A width output: the MLP width of every block before and after, then parameters and size."""
    from .units import human_bytes

    w = d["width"]
    fmt = lambda v: "?" if v is None else str(v)  # noqa: E731 - a block the state does not record
    lines = [f"MLP width of the decoder blocks in {d['model']}", _pruning_line(d["pruning"]),
             f"{'block':>5}  {'intermediate size before -> after':>34}"]
    lines += [f"{b['index']:>5}  {fmt(b['before']) + ' -> ' + fmt(b['after']):>34}" for b in w["blocks"]]
    p, n = w["parameters"], w["bytes"]
    lines.append(f"parameters {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.2%} fewer); "
                 f"size {human_bytes(n['before'])} -> {human_bytes(n['after'])}")
    c = w.get("channels_removed", {})
    if c.get("requested") is not None:
        lines.append(f"MLP channels removed: requested {c['requested']:.4f}"
                     + (f", achieved {c['achieved']:.4f}" if c.get("achieved") is not None else "")
                     + (f" (kept a multiple of {c['multiple']})" if c.get("multiple") else ""))
    if w.get("llama_cpp_warning"):
        lines.append(f"warning: {w['llama_cpp_warning']}")
    lines.append(f"exact zeros in the block weights: {d['overall']:.4f} (width pruning removes channels and adds no "
                 f"zeros)")
    return "\n".join(lines)


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StreamPruneError("a sparsity plot needs matplotlib: pip install matplotlib "
                               "(or pip install 'streamprune[plot]')") from None
    return Figure


def plot(d: dict, png: str | os.PathLike) -> None:
    """Per-block sparsity as bars above a linear x block heat map, saved as a PNG (for a width output: the MLP
    width of every block before and after)."""
    Figure = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    if "width" in d:
        _plot_width(d, png, Figure, MaxNLocator)
        return
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


def _plot_width(d: dict, png, Figure, MaxNLocator) -> None:
    w = d["width"]
    n = len(w["blocks"])
    fig = Figure(figsize=(max(6.0, 0.25 * n + 3), 3.5), layout="constrained")
    ax = fig.subplots()
    x = range(n)
    ax.bar(x, [b["before"] or 0 for b in w["blocks"]], color="lightgray", label="before")
    ax.bar(x, [b["after"] for b in w["blocks"]], color="tab:blue", label="after")
    p = w["parameters"]
    ax.set_title(f"MLP intermediate size per decoder block\nparameters {p['before']:,} -> {p['after']:,}", fontsize=10)
    ax.set_xlabel("block")
    ax.set_ylabel("intermediate size")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    fig.savefig(png, dpi=100)
