"""The memory model: predicted bytes of every buffer a prune job holds, from the config (and index) alone.

One block's weights (checkpoint dtype on the host while read/written, compute dtype on the device), two
activation buffers [nsamples, seqlen, hidden] (inputs and outputs of the current block), the transient of
one block forward (attention scores and MLP intermediates for one micro-batch), and the pruning workspace
of the largest linear in row chunks. `prune` uses the same numbers to choose the activation tier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .methods.base import BYTES_PER_METRIC_ELEMENT, Method
from .units import GiB, parse_size

WORKSPACE_BYTES = 512 * 1024 ** 2   # target transient of the metric + sort of one row chunk
HOST_HEADROOM = 0.85  # fraction of available host memory the activation cache may take


def row_chunk(in_features: int, budget: int = WORKSPACE_BYTES) -> int:
    return max(1, budget // (in_features * BYTES_PER_METRIC_ELEMENT))


@dataclass
class BlockShape:
    params: int           # parameters of one block
    largest_linear: tuple  # (out, in)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    stat_inputs: tuple = ()  # in_features of each distinct linear input (q/k/v share one, gate/up another)
    linear_shapes: tuple = ()  # each distinct (out, in) of the block's linears (one expert's for experts)
    experts: int = 0         # Mixture-of-Experts: experts in the block's experts module (0: a dense block)
    expert_params: int = 0   # parameters of one expert (its slice of every per-expert parameter)
    expert_inputs: tuple = ()  # in_features of one expert's matrices
    all_linear_shapes: tuple = ()  # (out, in) of every linear and every expert's matrix (the time estimate)
    active_params: int = 0   # parameters one token passes through (the routed experts' only; 0: all)
    ops_per_forward: int = 0  # small tensor operations of one block call, about (the time estimate)


# small tensor operations per module of a block call, the loop's own work per call included (reading the micro-batch
# from the store, writing its output, the call's kwargs): SmolLM2-135M's 13-module blocks at 8 tokens a call take
# 1.7 ms a call beyond their FLOPs, about 40 x 13 operations at the 3.3 us one took (benchmarks/plan_time.py)
OPS_PER_MODULE = 40


def block_shape(blocks: nn.ModuleList, config) -> BlockShape:
    """The shape of the largest block (DeepSeek-V3's first blocks are dense, the rest Mixture-of-Experts): its
    parameters, its largest matrix (a linear, or one expert's), the widest output of a linear or an expert, and
    the inputs statistics are gathered for (experts: one per expert and matrix)."""
    from .targets import targets
    from .modelinfo import text_config

    block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    found = targets(block)
    shapes = [(t.weight.shape[1:] if not t.transposed else t.weight.shape[1:][::-1]) if t.experts else
              t.weight.shape for t in found]
    largest = max(shapes, key=lambda s: (s[0] * s[1], s[1]))
    text = text_config(config)
    heads = getattr(text, "num_attention_heads", 1)
    linears = [t.module for t in found if t.experts is None]
    experts = tuple(t.in_features for t in found if t.experts for _ in range(t.experts))
    from .targets import expert_parameters, experts_modules

    modules = list(experts_modules(block).values())
    count = next((t.experts for t in found if t.experts), 0)
    per_expert = sum(getattr(m, a).numel() for m in modules for a in expert_parameters(m)) // count if count else 0
    params = sum(p.numel() for p in block.parameters())
    routed = min(count, int(getattr(text, "num_experts_per_tok", None) or count))
    return BlockShape(
        all_linear_shapes=tuple((int(s[0]), int(s[1])) for t, s in zip(found, shapes) for _ in range(t.experts or 1)),
        active_params=params - (count - routed) * per_expert,
        ops_per_forward=OPS_PER_MODULE * sum(1 for _ in block.modules()) + 8 * count,
        experts=count, expert_params=per_expert,
        expert_inputs=tuple(t.in_features for t in found if t.experts),
        params=params,
        largest_linear=(int(largest[0]), int(largest[1])),
        linear_shapes=tuple(sorted({(int(a), int(b)) for a, b in shapes})),
        hidden=text.hidden_size,
        intermediate=max(int(s[0]) for s in shapes),
        heads=heads,
        kv_heads=_widest(text, "num_key_value_heads", heads) or heads,
        head_dim=_widest(text, "head_dim", None) or text.hidden_size // heads,
        stat_inputs=_distinct_inputs(block, linears) + experts,
    )


def _widest(text, key: str, default):
    """config.`key`, or its largest value over the layers where it is a per-layer attribute (Gemma-4's head_dim:
    its full-attention layers are wider), which transformers refuses to read globally."""
    try:
        return getattr(text, key, default)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        values = [getattr(text.per_layer_config[i], key, None) for i in range(text.num_hidden_layers)]
        return max((v for v in values if v is not None), default=default)


def _distinct_inputs(block: nn.Module, linears: list) -> tuple:
    """in_features of each group of linears that read the same tensor: siblings in one module with one input
    width (q/k/v in attention, gate/up in the MLP), as BlockStatistics shares them; the rest one each."""
    groups: dict = {}
    for name, mod in block.named_modules():
        if any(mod is lin for lin in linears):
            groups.setdefault((name.rsplit(".", 1)[0], mod.in_features), []).append(name)
    return tuple(width for (_, width), names in groups.items() for _ in ([None] if len(names) > 1 else names))


@dataclass
class Plan:
    block_bytes_checkpoint: int     # one block as stored (read ahead / written back on the host)
    block_bytes_compute: int        # one block in the compute dtype on the compute device
    activation_buffer_bytes: int    # one of the two buffers [nsamples/ranks, seqlen, hidden]
    forward_transient_bytes: int    # live set inside one block forward for one micro-batch
    workspace_bytes: int            # prune phase of the linear that needs most (the method's workspace_bytes)
    statistics_bytes: int           # Hessians (SparseGPT) held from the dense pass to the prune phase
    row_chunk: int
    tier: str                       # where the activation buffers live: gpu, cpu or disk
    expert_group: int               # experts per group when a block's experts are streamed in groups (0: whole)
    overlap: bool                   # blocks read ahead and written behind (off when two blocks overfill the host)
    peak_gpu_bytes: int | None
    peak_host_bytes: int
    disk_bytes: int
    fits: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


# python + torch + transformers + the meta skeleton: a near-empty model's peak RSS is 370-460 MiB here. The spread
# is torch's shared libraries' file pages: 100 MiB once partly evicted from the page cache, 190 MiB just after an
# install (fault-around maps every cached page near a fault). Rounded up for the heap pages malloc keeps.
PROCESS_BASE = 550 * 1024 ** 2
CUDA_CONTEXT = 600 * 1024 ** 2   # CUDA context and kernels on the device, outside torch's allocator
GPU_SLACK = 1.08                 # caching-allocator fragmentation


def forward_transient(shape: BlockShape, seqlen: int, batch: int, itemsize: int, sdpa: bool = True) -> int:
    """Largest live set inside one block forward for one micro-batch (MLP intermediates or attention), plus the
    float32 copy the statistics hook makes of the widest linear input."""
    tokens = batch * seqlen
    mlp = tokens * shape.intermediate * itemsize * 3             # gate, up, act(gate) * up
    qkv = tokens * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * itemsize * 2  # q/k/v + rotated copies
    scores = 0 if sdpa else batch * shape.heads * seqlen * seqlen * itemsize * 2
    stats = tokens * shape.intermediate * 4
    return max(mlp, qkv + scores) + stats + tokens * shape.hidden * itemsize * 4


def make_plan(shape: BlockShape, *, nsamples: int, seqlen: int, batch: int, ckpt_itemsize: int,
              compute_itemsize: int, device_type: str, tier: str, gpu_free: int | None, host_free: int,
              checkpoint_bytes: int, needs_activations: bool = True, snapshot: bool = True, ranks: int = 1,
              needs: frozenset = frozenset({"sq_norm"}), hessian_inputs: tuple | None = None,
              expert_group: int = 0, overlap: bool = True, method: Method | None = None) -> Plan:
    """Predict the peaks of one rank. `gpu_free`/`host_free` are what the job may use (after any cap).

    A block with experts that does not fit whole (or `expert_group` > 0: that many experts per group) is planned
    with its experts streamed in groups (groups.py): the largest group that fits, read-ahead dropped when two
    blocks do not fit in host memory."""
    whole = _plan(shape, 0, overlap, nsamples=nsamples, seqlen=seqlen, batch=batch,
                  ckpt_itemsize=ckpt_itemsize, compute_itemsize=compute_itemsize, device_type=device_type, tier=tier,
                  gpu_free=gpu_free, host_free=host_free, checkpoint_bytes=checkpoint_bytes,
                  needs_activations=needs_activations, snapshot=snapshot, ranks=ranks, needs=needs,
                  hessian_inputs=hessian_inputs, method=method)
    if not shape.experts or (whole.fits and not expert_group) or hessian_inputs is not None:
        return whole

    def grouped(g, ov):
        return _plan(shape, g, ov, nsamples=nsamples, seqlen=seqlen, batch=batch, ckpt_itemsize=ckpt_itemsize,
                     compute_itemsize=compute_itemsize, device_type=device_type, tier=tier, gpu_free=gpu_free,
                     host_free=host_free, checkpoint_bytes=checkpoint_bytes, needs_activations=needs_activations,
                     snapshot=snapshot, ranks=ranks, needs=needs, method=method)
    if expert_group:  # the size asked for; read-ahead dropped if that is what makes it fit
        g = min(expert_group, shape.experts)
        best = grouped(g, overlap)
        alone = grouped(g, False) if overlap and not best.fits else best
        return alone if alone.fits else best
    def largest(ov):
        lo, hi = 1, shape.experts - 1  # the largest group that fits (peaks grow with the group)
        if not grouped(lo, ov).fits:
            return 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if grouped(mid, ov).fits else (lo, mid - 1)
        return -(-shape.experts // -(-shape.experts // lo))  # as few groups as that allows, of even sizes
    alone = largest(False)
    ahead = largest(True) if overlap else 0
    if alone == 0:
        return grouped(1, False)  # not even one expert at a time: its reason says so
    # read-ahead when it leaves groups at least half as large as without it (few, large groups: fewer passes)
    return grouped(ahead, True) if ahead and 2 * ahead >= alone else grouped(alone, False)


def _plan(shape: BlockShape, group: int, overlap: bool, *, nsamples: int, seqlen: int, batch: int,
          ckpt_itemsize: int, compute_itemsize: int, device_type: str, tier: str, gpu_free: int | None,
          host_free: int, checkpoint_bytes: int, needs_activations: bool = True, snapshot: bool = True,
          ranks: int = 1, needs: frozenset = frozenset({"sq_norm"}), hessian_inputs: tuple | None = None,
          method: Method | None = None) -> Plan:
    local = -(-nsamples // ranks)
    block_ckpt = shape.params * ckpt_itemsize
    block_compute = shape.params * compute_itemsize
    act = local * seqlen * shape.hidden * compute_itemsize if needs_activations else 0
    transient = forward_transient(shape, seqlen, batch, compute_itemsize) if needs_activations else 0
    out_f, in_f = shape.largest_linear
    shapes = shape.linear_shapes or (shape.largest_linear,)
    # one row chunk for every linear, sized for the widest input (not the largest matrix's: Mixtral's down
    # projection has 2.7x the input of its larger fused gate/up, and took 1.5 GB where 0.7 were planned)
    chunk = min(max(o for o, _ in shapes), row_chunk(max(i for _, i in shapes)))
    # the prune phase of the linear that needs most, by the method's own account (a selection's row chunk and mask;
    # SparseGPT's and ADMM's factorizations grow with in^2, so their largest is the widest input, not the largest)
    method = method or Method()
    if hessian_inputs is not None:  # structured width: its own refit (width.py), not a method's matrix prune
        workspace = Method().workspace_bytes(out_f, in_f, compute_itemsize, chunk)
    else:
        workspace = max(method.workspace_bytes(o, i, compute_itemsize, chunk) for o, i in shapes)
    # statistics held through the dense pass and the prune phase: Hessians (in^2 float32 per distinct input)
    # (`hessian_inputs` when the pruner says which: structured width's one down-projection input)
    widths = shape.stat_inputs if hessian_inputs is None else hessian_inputs
    hessians = sum(n * n * 4 for n in widths) if "hessian" in needs else 0
    io_blocks = 2 * block_ckpt  # on the host at the end of a block: the next one (read ahead) and its outgoing copy
    micro = 2 * batch * seqlen * shape.hidden * compute_itemsize  # a micro-batch in and out on the device
    calls = 0
    if group:
        # experts in groups: on the device the block without its experts plus one group; Hessians of the group
        # or of the other linears, never both; on the host the block as read (the experts written back into it)
        # and, with read-ahead, one more; the recorded expert calls and their summed outputs (2 x activations)
        rest = shape.params - shape.experts * shape.expert_params
        block_compute = (rest + group * shape.expert_params) * compute_itemsize
        if compute_itemsize < ckpt_itemsize:  # originals kept: the group's masks go back with it
            block_compute += group * shape.expert_params
        per_expert = sum(n * n * 4 for n in shape.expert_inputs)
        others = sum(n * n * 4 for n in shape.stat_inputs[:len(shape.stat_inputs) - shape.experts *
                                                          len(shape.expert_inputs)])
        hessians = max(others, group * per_expert) if "hessian" in needs else 0
        io_blocks = (2 if overlap else 1) * block_ckpt
        calls = 2 * local * seqlen * shape.hidden * compute_itemsize if needs_activations else 0

    reason = ""
    if device_type == "cuda":
        gpu_base = CUDA_CONTEXT + GPU_SLACK * (block_compute + hessians + max(transient, workspace))
        if tier == "auto":
            if not needs_activations:
                tier = "cpu"
            elif gpu_free is not None and gpu_base + GPU_SLACK * (2 * act + calls) <= gpu_free:
                tier = "gpu"
            elif 2 * act + calls + io_blocks + PROCESS_BASE <= host_free * HOST_HEADROOM:
                tier = "cpu"
            else:
                tier = "disk"
        on_gpu = tier == "gpu"  # the recorded expert calls live beside the activations (host for cpu and disk)
        peak_gpu = int(gpu_base + GPU_SLACK * ((2 * act + calls) if on_gpu else micro))
        peak_host = PROCESS_BASE + io_blocks + (2 * act if tier == "cpu" else 0) + (0 if on_gpu else calls)
        fits = (gpu_free is None or peak_gpu <= gpu_free) and peak_host <= host_free
        if gpu_free is not None and peak_gpu > gpu_free:
            alone = CUDA_CONTEXT + GPU_SLACK * (block_compute + hessians + workspace)
            reason = ("one block and its forward do not fit the GPU; lower --seqlen or --batch-size"
                      if alone <= gpu_free else
                      f"one block is larger than the GPU ({block_compute / GiB:.1f} GiB in the compute dtype"
                      + (f", {hessians / GiB:.1f} GiB of Hessians" if hessians else "") + ")"
                      + (" even with one expert at a time" if group else "")
                      + "; prune it on a larger card or on the CPU")
    else:
        # one I/O thread (io.py): besides the block being computed, one block is in flight, the previous one being
        # written or the next one read ahead, never both. At the end of a block its outgoing checkpoint-dtype copy
        # is built tensor by tensor as the compute copy is dropped (model.block_tensors): one tensor more (none
        # when the dtypes agree: the computed tensors are written). On top: a forward transient or the prune
        # workspace. Without an exact round trip (compute dtype narrower than the checkpoint's) the original
        # tensors and every linear's bool mask are kept as well.
        exact = compute_itemsize >= ckpt_itemsize
        kept = 0 if exact else block_ckpt + shape.params
        out_copy = 0 if compute_itemsize == ckpt_itemsize else out_f * in_f * ckpt_itemsize
        if group:  # the block as read stays (io_blocks), its experts written back into it: no outgoing copy
            kept = 0 if exact else (shape.params - shape.experts * shape.expert_params) * (ckpt_itemsize + 1)
            fixed = PROCESS_BASE + block_compute + io_blocks + kept + hessians + calls + max(transient, workspace)
        else:
            fixed = PROCESS_BASE + block_compute + block_ckpt + kept + hessians + max(out_copy, transient, workspace)
        if tier in ("auto", "gpu"):
            tier = "cpu" if not needs_activations or fixed + 2 * act <= host_free * HOST_HEADROOM else "disk"
        peak_gpu = None
        peak_host = fixed + (2 * act if tier == "cpu" else micro)
        fits = peak_host <= host_free
    if not fits and not reason:
        reason = "one block, its neighbours in flight and its workspace do not fit in host memory"
    disk = checkpoint_bytes + (2 * act if tier == "disk" else 0) + (act * ranks if snapshot else 0)
    return Plan(block_ckpt, block_compute, act, transient, workspace, hessians, chunk, tier, group, overlap,
                peak_gpu, int(peak_host), int(disk), bool(fits), reason)


def plan_job(spec, blocks, ckpt) -> Plan:
    """The plan of a resolved prune job on this machine: free GPU memory (under any cap) and available host memory."""
    import psutil

    o = spec.options
    gpu_free = None
    if spec.device.type == "cuda":
        gpu_free = torch.cuda.mem_get_info(spec.device)[0]
        if spec.gpu_limit:
            gpu_free = min(gpu_free, spec.gpu_limit)
    return make_plan(block_shape(blocks, spec.model.config), nsamples=o.nsamples, seqlen=o.seqlen, batch=o.batch_size,
                     ckpt_itemsize=itemsize(spec.checkpoint_dtype), compute_itemsize=itemsize(spec.dtype),
                     device_type=spec.device.type, tier=o.activations, gpu_free=gpu_free,
                     host_free=psutil.virtual_memory().available,
                     checkpoint_bytes=sum(t.nbytes for t in ckpt.tensors.values()), needs_activations=spec.needs_data,
                     snapshot=o.snapshot_every > 0, needs=spec.pruner.needs,
                     hessian_inputs=spec.pruner.hessian_widths() if spec.structure.width else None,
                     expert_group=o.expert_group, overlap=o.overlap,
                     method=None if spec.structure.width else spec.pruner)


def check_disk(plan: Plan, out, written: int) -> None:
    """Enough free space in OUT for what is left to write, plus a margin (2%, at least 1 MiB)."""
    import shutil

    from .errors import StreamPruneError
    from .units import human_bytes

    remaining = max(0, plan.disk_bytes - written)
    need = remaining + max(1024 ** 2, remaining // 50)
    free = shutil.disk_usage(out).free
    if need > free:
        raise StreamPruneError(f"not enough disk space in {out}: the job needs {human_bytes(need)} "
                               f"(pruned shards plus activation cache plus margin), {human_bytes(free)} is free")


def _weights_present(model_dir) -> bool:
    """Are the checkpoint's safetensors files there (every shard its index names, or model.safetensors)?"""
    import json

    from .shards import INDEX_NAME, SINGLE_NAME

    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return True  # Checkpoint names what is wrong with it
        return all((model_dir / shard).is_file() for shard in shards)
    return (model_dir / SINGLE_NAME).is_file()


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_for(model_dir, *, gpu_memory=None, host_memory=None, device: str | None = None, ranks: int = 1,
             snapshot: bool = True, **options) -> dict:
    """The plan for a checkpoint directory from config.json (and the index, if present) alone: no weights read.

    `options` are prune's (spec.PruneOptions: nsamples, seqlen, batch_size, dtype, activations, method, refine,
    structure, sparsity, expert_group, ...), checked exactly as prune checks them. `device` defaults to cuda when
    `gpu_memory` is given; `host_memory` defaults to what is available now. Also returns, for 8/12/16/24 GB cards,
    the tier and the predicted peaks with the same settings. With `structure="width"`: the channels prune would
    keep ("width": requested and achieved fractions, the llama.cpp warning) and the output's size ("bytes_after").
    """
    import json

    import psutil

    from .model import StreamedModel, build_skeleton, find_blocks
    from .shards import INDEX_NAME, Checkpoint
    from .modelinfo import ModelInfo
    from .spec import PruneOptions, check_ranks, compute_dtype, parse_dtype
    from .width import width_pruner

    # the same checks as prune's (a plan needs no calibration file: `calib` stands in for one)
    o = PruneOptions.from_dict(dict(options, calib="-"))
    o.check()
    check_ranks(ranks, o.nsamples, o.batch_size)
    gpu = parse_size(gpu_memory, "--gpu-memory-limit")
    host = parse_size(host_memory, "--host-memory") or psutil.virtual_memory().available
    info = ModelInfo.load(model_dir)
    model_dir, config, text = info.path, info.config, info.text
    if _weights_present(model_dir):  # checked as prune checks them (headers only); a config alone is planned as is
        model = StreamedModel(config, Checkpoint(model_dir), "cpu", None)
        model.check()
        blocks = model.blocks
    else:
        blocks = find_blocks(build_skeleton(config), config)[1]
    shape = block_shape(blocks, config)
    ckpt_dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or torch.bfloat16
    ckpt_dtype = getattr(torch, ckpt_dtype) if isinstance(ckpt_dtype, str) else ckpt_dtype
    from .layout import fp8_block
    from .methods import Structure, check_prunable

    stored = torch.float8_e4m3fn if fp8_block(config) else ckpt_dtype  # FP8 releases: one byte per block weight
    device = device or ("cuda" if gpu is not None else "cpu")
    requested = parse_dtype(o.dtype)
    compute = compute_dtype(requested, ckpt_dtype, torch.device(device))
    seqlen = info.seqlen(o.seqlen)
    structure = Structure.parse(o.structure)
    for _, width in shape.linear_shapes:  # N:M must divide every linear's input, as prune checks it
        check_prunable(width, structure)
    index = model_dir / INDEX_NAME
    if index.is_file():
        ckpt_bytes = json.loads(index.read_text())["metadata"]["total_size"]
    else:
        ckpt_bytes = sum(p.numel() for p in blocks.parameters()) * itemsize(stored) + \
            2 * text.vocab_size * text.hidden_size * itemsize(ckpt_dtype)
    # what prune would build (structured width: its refit, planned as plan_job plans it)
    pruner = width_pruner(info, o, compute, ckpt_dtype) if structure.width else o.pruner()
    extra = {}
    if structure.width:  # the width kept, as requested and achieved, and the output's size (width.py)
        from .width import check_model, removed_bytes, width_facts

        check_model(blocks, config)
        extra = {"width": width_facts(pruner.intermediate, pruner.keep, o.sparsity, o.width_multiple),
                 "bytes_after": ckpt_bytes - removed_bytes(blocks, pruner.intermediate, pruner.keep,
                                                           itemsize(ckpt_dtype))}
    common = dict(nsamples=o.nsamples, seqlen=seqlen, batch=o.batch_size, ckpt_itemsize=itemsize(stored),
                  host_free=host, checkpoint_bytes=ckpt_bytes, needs_activations=pruner.needs_data,
                  snapshot=snapshot and o.snapshot_every > 0, ranks=ranks, needs=pruner.needs,
                  hessian_inputs=pruner.hessian_widths() if structure.width else None,
                  expert_group=o.expert_group, method=None if structure.width else pruner)
    main = make_plan(shape, device_type=device, tier=o.activations, gpu_free=gpu, compute_itemsize=itemsize(compute),
                     **common)
    timing = _time_estimate(shape, len(blocks), o, seqlen, ranks, pruner, structure, torch.device(device), compute,
                            hessian_inputs=common["hessian_inputs"])
    cards = {}
    for gb in (8, 12, 16, 24):
        p = make_plan(shape, device_type="cuda", tier="auto", gpu_free=gb * GiB,
                      compute_itemsize=itemsize(requested or ckpt_dtype), **common)
        cards[f"{gb}GB"] = {"tier": p.tier, "peak_gpu_bytes": p.peak_gpu_bytes, "peak_host_bytes": p.peak_host_bytes,
                            "fits": p.fits, "expert_group": p.expert_group}
    return {"model": str(model_dir), "blocks": len(blocks), "block_params": shape.params, "experts": shape.experts,
            "largest_linear": list(shape.largest_linear), "hidden": shape.hidden, "checkpoint_dtype": str(stored)[6:],
            "compute_dtype": str(compute)[6:], "device": device, "nsamples": o.nsamples, "seqlen": seqlen,
            "batch_size": o.batch_size, "ranks": ranks, "method": o.method, "structure": str(structure),
            "sparsity": o.sparsity, "checkpoint_bytes": ckpt_bytes, "host_memory": host, "gpu_memory": gpu,
            "plan": main.as_dict(), "cards": cards, "time": timing, **extra}


def _time_estimate(shape, n_blocks, o, seqlen, ranks, pruner, structure, device, compute, hessian_inputs) -> dict:
    """The job's time (timing.py) from rates measured on `device` now; without that device, why not."""
    from .methods import profile_named
    from .timing import estimate, measure

    if device.type == "cuda" and not torch.cuda.is_available():
        return {"seconds": None, "reason": "no CUDA device on this machine to measure; run plan where the job runs"}
    passes = (2 if pruner.needs_data else 0) + bool(profile_named(o.sparsity_profile, o).sweeps)
    needs = pruner.needs
    if hessian_inputs is not None:  # structured width: the one Hessian of the consumer's input
        shape = replace(shape, stat_inputs=hessian_inputs[:1])
    shapes = shape.linear_shapes or (shape.largest_linear,)
    rates = measure(device, compute, shape.hidden, max(out for out, _ in shapes), o.batch_size * seqlen,
                    tuple(inp for _, inp in shapes))
    return estimate(shape, n_blocks, nsamples=o.nsamples, seqlen=seqlen, batch=o.batch_size, ranks=ranks,
                    pruner=pruner, passes=passes, needs=needs, rates=rates, structure=structure,
                    sparsity=o.sparsity)
