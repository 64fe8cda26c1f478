"""The time model: a prune job's work counted from its block's shapes, over rates measured on the device.

Work per block: the calibration forwards (the dense pass that gathers statistics, the pass through the pruned
block that makes the next block's inputs, and a profile's sweep), 2 FLOPs per parameter and token (the active
experts' parameters in a Mixture-of-Experts block) plus causal attention; SparseGPT's and ADMM's Hessians
(2 in^2 FLOPs per token and input); each linear's prune, as the method counts it (`Method.prune_work`). Three
rates are measured for a moment on the device the job would use: a matmul at the block's width, the mask
selection, and one small tensor operation (Python and dispatch: what a small model's many ops cost). Reading and
writing overlap the compute on the I/O thread and are not counted. `benchmarks/plan_time.py` holds the estimate
against measured jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .methods.base import Structure, Work, select

PROBE_SECONDS = 0.15  # per rate


@dataclass(frozen=True)
class Rates:
    matmul: float   # FLOP/s of a [tokens, hidden] x [hidden, width] matmul in the compute dtype (one micro-batch)
    select: dict    # in_features -> metric elements per second through the mask selection of rows that wide
    step: float     # seconds of one small tensor operation
    elementwise: float = 1e9  # elements per second of an in-place elementwise op on one micro-batch's activations

    def seconds(self, work: Work, inp: int | None = None) -> float:
        sel = self.select.get(inp) or min(self.select.values(), default=1e8)
        return (work.flops / self.matmul + work.selections / sel + work.steps * self.step
                + work.elements / self.elementwise)


def _timed(fn, sync) -> float:
    """Seconds per call of fn, repeated for about PROBE_SECONDS after one warm-up call."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= PROBE_SECONDS:
            return dt / n


def measure(device: torch.device, dtype: torch.dtype, hidden: int, width: int, tokens: int,
            inputs: tuple = ()) -> Rates:
    """The three rates on `device` (its current thread settings), from short probes of the job's own shapes: the
    matmul of one micro-batch (`tokens` rows) and the selection at each linear input width in `inputs`."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens, width = max(16, min(tokens, 4096)), min(width, 16384)
    a = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    b = torch.randn(hidden, width, generator=gen).to(device, dtype)
    matmul = 2 * tokens * hidden * width / _timed(lambda: a @ b, sync)
    sel = {}
    for inp in sorted(set(inputs) or {hidden}):
        metric = torch.rand(256, inp, generator=gen).to(device)
        sel[inp] = metric.numel() / _timed(lambda: select(metric, 0.5, Structure()), sync)
    small = torch.zeros(8, device=device)
    step = _timed(lambda: [small.add_(1) for _ in range(100)], sync) / 100
    act = torch.randn(tokens, width, generator=gen).to(device, dtype)
    elementwise = act.numel() / _timed(lambda: act.mul_(1.0), sync)
    return Rates(matmul, sel, step, elementwise)


def forward_flops(params_active: int, tokens: int, seqlen: int, heads: int, head_dim: int) -> int:
    """One block forward over `tokens` tokens in windows of `seqlen`: the linears and causal attention (QK^T and
    AV, each 2 x seqlen/2 x heads x head_dim per token)."""
    return 2 * params_active * tokens + 2 * tokens * seqlen * heads * head_dim


def elementwise_per_token(shape, seqlen: int) -> int:
    """Elements one token's activations take through the block's elementwise ops: norms, residual adds and
    rotary on hidden-wide vectors (about 10 passes), the MLP's activation and product (4 passes over the
    intermediate width), softmax over the causal half of each head's scores (4 passes)."""
    return 10 * shape.hidden + 4 * shape.intermediate + 2 * shape.heads * seqlen


def estimate(shape, blocks: int, *, nsamples: int, seqlen: int, batch: int, ranks: int, pruner, passes: int,
             needs: frozenset, rates: Rates, structure: Structure, sparsity: float) -> dict:
    """Seconds of the whole job for one rank, split into forward, statistics and prune (per block and in all)."""
    tokens = -(-nsamples // ranks) * seqlen
    calls = -(-nsamples // ranks) // max(1, batch) or 1
    fwd = Work(flops=forward_flops(shape.active_params or shape.params, tokens, seqlen, shape.heads, shape.head_dim),
               steps=calls * shape.ops_per_forward, elements=tokens * elementwise_per_token(shape, seqlen))
    # the dense pass's statistics hooks: each distinct input copied to float32, squared and summed per token
    # (and about 30 small operations per input and call: 0.35 ms a call over SmolLM2's 4 inputs, measured)
    hooks = Work(elements=3 * tokens * sum(shape.stat_inputs), steps=calls * 30 * len(shape.stat_inputs))
    stats = Work(flops=sum(2 * tokens * n * n for n in shape.stat_inputs) if "hessian" in needs else 0)
    prune = 0.0
    for out, inp in shape.all_linear_shapes or shape.linear_shapes:
        # the method's own work, then the mask applied, checked (+0, N:M) and counted: one more pass over W
        prune += rates.seconds(pruner.prune_work(out, inp, structure, sparsity) + Work(selections=out * inp), inp)
    per = {"forward": passes * rates.seconds(fwd), "statistics": rates.seconds(stats + (hooks if passes else Work())),
           "prune": prune}
    block = sum(per.values())
    return {"seconds": block * blocks, "block_seconds": block, **{f"{k}_seconds": v * blocks for k, v in per.items()},
            "rates": {"matmul_flops": rates.matmul, "select_per_second": {str(k): v for k, v in rates.select.items()},
                      "step_seconds": rates.step}}
