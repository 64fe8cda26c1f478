"""The memory model: predicted bytes of every buffer a prune job holds, from the config (and index) alone.

One block's weights (checkpoint dtype on the host while read/written, compute dtype on the device), two
activation buffers [nsamples, seqlen, hidden] (inputs and outputs of the current block), the transient of
one block forward (attention scores and MLP intermediates for one micro-batch), and the pruning workspace
of the largest linear in row chunks. `prune` uses the same numbers to choose the activation tier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

GiB = 1024 ** 3
WORKSPACE_BYTES = 512 * 1024 ** 2   # target transient of the metric + sort of one row chunk
BYTES_PER_METRIC_ELEMENT = 4 + 4 + 8 + 1 + 4  # metric, sorted values, sorted indices, mask, |W| temp
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


def block_shape(blocks: nn.ModuleList, config) -> BlockShape:
    block = blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    largest = max(linears, key=lambda m: m.weight.numel())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    return BlockShape(
        params=sum(p.numel() for p in block.parameters()),
        largest_linear=(largest.out_features, largest.in_features),
        hidden=text.hidden_size,
        intermediate=max(m.out_features for m in linears),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", heads) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
    )


@dataclass
class Plan:
    block_bytes_checkpoint: int
    block_bytes_compute: int
    activation_buffer_bytes: int   # one of the two buffers
    forward_transient_bytes: int
    workspace_bytes: int
    row_chunk: int
    tier: str
    peak_gpu_bytes: int | None
    peak_host_bytes: int
    disk_bytes: int
    fits: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def forward_transient(shape: BlockShape, seqlen: int, batch: int, itemsize: int, sdpa: bool = True) -> int:
    """Largest live set inside one block forward for one micro-batch (MLP intermediates or attention)."""
    tokens = batch * seqlen
    mlp = tokens * shape.intermediate * itemsize * 3             # gate, up, act(gate)*up
    qkv = tokens * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * itemsize * 2  # q/k/v + rotated copies
    scores = 0 if sdpa else batch * shape.heads * seqlen * seqlen * itemsize * 2
    stats = tokens * shape.intermediate * 4  # float32 copy of the widest linear input in the statistics hook
    return max(mlp, qkv + scores) + stats + tokens * shape.hidden * itemsize * 4


def make_plan(shape: BlockShape, *, nsamples: int, seqlen: int, batch: int, ckpt_itemsize: int,
              compute_itemsize: int, device_type: str, tier: str, gpu_free: int | None, host_free: int,
              checkpoint_bytes: int, needs_activations: bool = True, snapshot: bool = True) -> Plan:
    block_ckpt = shape.params * ckpt_itemsize
    block_compute = shape.params * compute_itemsize
    act = nsamples * seqlen * shape.hidden * compute_itemsize if needs_activations else 0
    transient = forward_transient(shape, seqlen, batch, compute_itemsize) if needs_activations else 0
    chunk = row_chunk(shape.largest_linear[1])
    workspace = chunk * shape.largest_linear[1] * BYTES_PER_METRIC_ELEMENT + shape.largest_linear[0] * shape.largest_linear[1]
    io_blocks = 2 * block_ckpt  # one block being read ahead, one being written

    reason = ""
    if device_type == "cuda":
        base_gpu = block_compute + transient + workspace
        if tier == "auto":
            if not needs_activations:
                tier = "cpu"
            elif gpu_free is not None and base_gpu + 2 * act <= gpu_free * 0.9:
                tier = "gpu"
            elif 2 * act <= host_free * HOST_HEADROOM:
                tier = "cpu"
            else:
                tier = "disk"
        peak_gpu = base_gpu + (2 * act if tier == "gpu" else 2 * batch * seqlen * shape.hidden * compute_itemsize)
        peak_host = io_blocks + (2 * act if tier == "cpu" else 0)
        fits = gpu_free is None or peak_gpu <= gpu_free
        if not fits:
            reason = "one block plus its forward does not fit the GPU; lower --seqlen or --batch-size"
    else:
        if tier in ("auto", "gpu"):
            tier = "cpu" if 2 * act <= max(0, host_free - block_compute - io_blocks) * HOST_HEADROOM else "disk"
        peak_gpu = None
        peak_host = block_compute + io_blocks + transient + workspace + (2 * act if tier == "cpu" else 0)
        fits = peak_host <= host_free
        if not fits:
            reason = "one block and its workspace do not fit in host memory"
    disk = checkpoint_bytes + (2 * act if tier == "disk" else 0) + (act if snapshot else 0)
    return Plan(block_ckpt, block_compute, act, transient, workspace, chunk, tier, peak_gpu, peak_host, disk, fits, reason)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
