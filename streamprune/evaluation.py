"""Perplexity of a checkpoint, computed block by block with the prune job's streaming machinery.

Only one decoder block's weights are materialized at a time; the hidden states of every window live in one
host tensor. The head (final norm, output projection, logit softcapping, ...) is not re-implemented per family:
the model's own forward runs once more per batch with every block replaced by a stand-in that passes hidden
states through, except the last, which returns the stored final hidden states.

Formula (the evaluation protocol of Sun et al. 2023): the token stream is cut into non-overlapping windows of
`seqlen` tokens (tail dropped); each window's loss is the mean cross-entropy of its shifted logits
(`logits[:, :-1]` against `ids[:, 1:]`, i.e. seqlen - 1 predicted tokens); nll is the mean of the window losses
and ppl = exp(nll). All windows have the same length, so this is also the mean NLL over all predicted tokens.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import read_text, tokenize
from .errors import StreamPruneError
from .memory import MemoryMonitor
from .progress import bar as progress_bar
from .model import StreamedModel, capture
from .targets import block_output, expert_parameters, experts_modules, targets
from .runtime import collect_new_only
from .shards import Checkpoint
from .modelinfo import ModelInfo
from .spec import compute_dtype, parse_dtype, resolve_device, slow_on_cpu


def read_token_stream(text_file: str | os.PathLike, model_dir: Path) -> torch.Tensor:
    """The whole file, as is, tokenized once with the model's tokenizer (no special tokens): a 1-D id tensor."""
    path = Path(text_file)
    return tokenize(read_text(path, "--text"), model_dir, hint=f" to tokenize {path}")


def make_windows(stream: torch.Tensor, seqlen: int, windows: int | None, source: str) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `seqlen` tokens (all when None): [windows, seqlen]."""
    available = stream.numel() // seqlen
    if available == 0:
        raise StreamPruneError(f"{source}: {stream.numel()} tokens, too short for one window of --seqlen {seqlen}")
    if windows is not None and windows > available:
        raise StreamPruneError(f"{source}: {stream.numel()} tokens make {available} windows of {seqlen}, "
                               f"--windows asks for {windows}")
    n = available if windows is None else windows
    return stream[:n * seqlen].reshape(n, seqlen)


class _PassThrough(nn.Module):
    """Stands in for a block in the head pass; the last one returns the stored final hidden states."""

    def __init__(self, final: dict | None = None):
        super().__init__()
        self.final = final

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.final is None else self.final["hidden"]


class _Evaluator(StreamedModel):
    """The streamed model plus what perplexity needs: a host buffer of hidden states and the model's own head."""

    @torch.no_grad()
    def capture_inputs(self, ids: torch.Tensor, batches: list) -> tuple[torch.Tensor, dict]:
        """Block-0 inputs of every window (a host tensor) and each block's call kwargs per batch size."""
        hidden, kwargs = None, {}
        self.materialize_outside(with_head=False)
        try:
            for j0, j1 in batches:
                got = capture(self.skeleton, self.blocks, [ids[j0:j1]], self.device)
                if hidden is None:
                    hidden = torch.empty((ids.shape[0], *got.inputs[0].shape[1:]), dtype=self.dtype)
                hidden[j0:j1] = got.inputs[0]
                for size, kw in got.kwargs.items():
                    kwargs.setdefault(size, kw)
        finally:
            self.release_outside()
        return hidden, kwargs

    @torch.no_grad()
    def run_block(self, i: int, hidden: torch.Tensor, kwargs: dict, batches: list, progress: bool,
                  expert_group: int = 0) -> None:
        """Replace `hidden` in place by block i's outputs (its experts `expert_group` at a time when given)."""
        found = experts_modules(self.blocks[i]) if expert_group else {}
        if found:  # one experts module per block: evaluate's check_blocks
            return self._run_grouped(i, hidden, kwargs, batches, progress, expert_group, *next(iter(found.items())))
        block, _ = self.load_block(i)
        try:
            for j0, j1 in progress_bar(batches, desc=f"block {i}", leave=False, enabled=progress):
                y = block_output(block, hidden[j0:j1].to(self.device), kwargs[j1 - j0][i])
                hidden[j0:j1] = y.to("cpu")
        finally:
            self.release_block(i)

    def _run_grouped(self, i: int, hidden, kwargs: dict, batches: list, progress: bool, size: int, name: str,
                     module: nn.Module) -> None:
        """run_block with the block's experts streamed through the device in groups (groups.py, steps 1-3)."""
        from .groups import Calls, ExpertSource, Replaced, sum_outputs
        from .statistics import StopForward

        params = expert_parameters(module)
        src = ExpertSource(self, i, {}, name, params, size, torch.device("cpu"))
        block, src.kept = self.load_block(i, grouped=frozenset(src.local(a) for a in params))
        calls = Calls(src.store)
        try:
            with Replaced(module, calls.record):
                for k, (j0, j1) in enumerate(batches):
                    calls.batch, calls.sequences = k, j1 - j0
                    try:
                        block_output(block, hidden[j0:j1].to(self.device), kwargs[j1 - j0][i])
                    except StopForward:
                        pass
            sum_outputs(module, [t for t in targets(block) if t.module is module], src, calls, self.device)
            with Replaced(module, calls.replay):
                for k, (j0, j1) in enumerate(progress_bar(batches, desc=f"block {i}", leave=False, enabled=progress)):
                    calls.batch = k
                    hidden[j0:j1] = block_output(block, hidden[j0:j1].to(self.device), kwargs[j1 - j0][i]).to("cpu")
        finally:
            del calls
            self.release_block(i)

    @torch.no_grad()
    def window_losses(self, ids: torch.Tensor, hidden: torch.Tensor, batches: list, progress: bool) -> torch.Tensor:
        """Mean shifted-token NLL of every window, from the final hidden states through the model's own head."""
        final: dict = {}
        originals = list(self.blocks)
        n = len(originals)
        for i in range(n):
            self.blocks[i] = _PassThrough(final if i == n - 1 else None)
        losses = torch.empty(ids.shape[0], dtype=torch.float64)
        self.materialize_outside(with_head=True)
        try:
            for j0, j1 in progress_bar(batches, desc="head", leave=False, enabled=progress):
                final["hidden"] = hidden[j0:j1].to(self.device)
                x = ids[j0:j1].to(self.device)
                logits = self.skeleton(input_ids=x, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
                losses[j0:j1] = nll.view(j1 - j0, -1).mean(dim=1).double().cpu()
        finally:
            final.clear()
            self.release_outside()
            for i in range(n):
                self.blocks[i] = originals[i]
        return losses


def _check_args(windows, batch_size) -> None:
    if windows is not None and windows < 1:
        raise StreamPruneError("--windows must be at least 1")
    if batch_size < 1:
        raise StreamPruneError("--batch-size must be at least 1")


def evaluate(model_dir: str | os.PathLike, text_file: str | os.PathLike | None = None, seqlen: int | None = None,
             windows: int | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
             progress: bool = True, batch_size: int = 1, ids: torch.Tensor | None = None, expert_group: int = 0) -> dict:
    """WikiText-style perplexity of the checkpoint in `model_dir` on `text_file`, one block in memory at a time.

    seqlen defaults to min(2048, model context); windows=None uses every full window. `ids` (a 1-D token
    stream) replaces the text file and tokenizer. dtype defaults to float32 on CPU, the checkpoint's on CUDA.
    `expert_group` > 0: Mixture-of-Experts blocks run with their experts that many at a time on the device (for
    blocks larger than the card; the same numbers as whole blocks).
    """
    t0 = time.perf_counter()
    _check_args(windows, batch_size)
    if expert_group < 0:
        raise StreamPruneError("--expert-group must be 0 (whole blocks) or a positive number of experts")
    info = ModelInfo.load(model_dir)
    requested = parse_dtype(dtype)
    dev = resolve_device(device)
    seqlen = info.seqlen(seqlen)
    if ids is None:
        if text_file is None:
            raise StreamPruneError("evaluate needs a text file (or a token id stream)")
        stream, source = read_token_stream(text_file, info.path), str(text_file)
    else:
        stream, source = ids.reshape(-1).long(), "token ids"
    data = make_windows(stream, seqlen, windows, source)
    if ((data < 0) | (data >= info.text.vocab_size)).any():
        raise StreamPruneError(f"{source}: token ids outside the vocabulary (size {info.text.vocab_size})")

    ckpt = Checkpoint(info.path)
    compute = compute_dtype(requested, ckpt.dtype, dev)
    if slow_on_cpu(dev, compute):
        print(slow_on_cpu(dev, compute), file=sys.stderr)
    with collect_new_only(), MemoryMonitor(device=dev) as mon:
        model = _Evaluator(info.config, ckpt, dev, compute)
        model.check()
        if expert_group:
            from .groups import check_blocks

            why = check_blocks(model.blocks, info.text.hidden_size, compute)
            if why:
                raise StreamPruneError(f"--expert-group: experts streamed in groups are not supported {why}")
        n = data.shape[0]
        batches = [(j, min(n, j + batch_size)) for j in range(0, n, batch_size)]
        hidden, kwargs = model.capture_inputs(data, batches)
        for i in progress_bar(range(len(model.blocks)), desc="blocks", unit="block", enabled=progress):
            model.run_block(i, hidden, kwargs, batches, progress, expert_group)
        losses = model.window_losses(data, hidden, batches, progress)
    nll = float(losses.mean())
    out = {"model": str(info.path), "ppl": math.exp(nll), "nll": nll, "windows": n, "seqlen": seqlen,
           "tokens": n * seqlen, "stream_tokens": stream.numel(), "device": str(dev),
           "compute_dtype": str(compute).replace("torch.", ""), "wall_seconds": time.perf_counter() - t0}
    out.update(mon.report())
    return out
