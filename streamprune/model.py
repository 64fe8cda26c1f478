"""The model's own code, without its weights: a skeleton, its decoder blocks, and block-0 input capture.

The skeleton is built from config.json with every parameter on the meta device (no memory) while buffers
are real, so that non-persistent buffers such as rotary `inv_freq` or Gemma's `embed_scale` come out as the
model computes them. Parameters are assigned only for what one step needs and dropped back to meta after.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import StreamPruneError
from .shards import Checkpoint


@contextlib.contextmanager
def _params_on_meta():
    """Register every new nn.Parameter on the meta device; buffers stay real (accelerate's trick)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise StreamPruneError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        json.loads((model_dir / "config.json").read_text())
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise StreamPruneError(f"{model_dir}/config.json: cannot be read as a transformers config ({str(e).splitlines()[0]})") from None


def build_skeleton(config, attn_implementation: str = "sdpa") -> nn.Module:
    """A causal-LM instance of the config's architecture with all parameters on meta."""
    from transformers import AutoModelForCausalLM

    arch = ",".join(getattr(config, "architectures", None) or [config.model_type])
    unsupported = (f"unsupported architecture {arch} (model_type {config.model_type!r}): streamprune prunes "
                   f"decoder-only causal language models")
    named = getattr(config, "architectures", None)
    if getattr(config, "is_encoder_decoder", False) or (named and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in named)):
        raise StreamPruneError(unsupported)
    try:
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except ValueError as e:
        raise StreamPruneError(f"{unsupported} ({str(e).splitlines()[0][:120]})") from None
    if any(getattr(m, "is_causal", True) is False for m in model.modules()):
        raise StreamPruneError(f"{unsupported}: its attention is not causal")
    return model.eval().requires_grad_(False)


def find_blocks(model: nn.Module, config) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list of same-class modules that contain linears."""
    n_layers = getattr(config, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not any(isinstance(x, nn.Linear) for x in mod[0].modules()):
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise StreamPruneError(f"unsupported architecture {type(model).__name__}: no list of decoder blocks found")
    return best[0], best[1]


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def checkpoint_names(module: nn.Module) -> list[str]:
    """Names of the tensors a checkpoint holds for `module`: parameters and persistent buffers."""
    persistent = [n for n, _ in module.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(module, n)]
    return [n for n, _ in module.named_parameters()] + persistent


def materialize(module: nn.Module, prefix: str, ckpt: Checkpoint, device, dtype, pin: bool = False,
                skip=lambda name: False) -> None:
    """Assign every parameter (and persistent buffer) of `module` from the checkpoint, cast to `dtype`."""
    for name in checkpoint_names(module):
        if skip(name):
            continue
        full = prefix + name
        if full not in ckpt.tensors:
            raise StreamPruneError(f"{ckpt.path}: tensor {full} is missing from the checkpoint")
        t = ckpt.read(full, pin=pin)
        expected = tuple(_get(module, name).shape)
        if tuple(t.shape) != expected:
            raise StreamPruneError(f"{ckpt.path}: tensor {full} has shape {list(t.shape)}, the config implies {list(expected)}")
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype, non_blocking=pin)
        else:
            t = t.to(device=device, non_blocking=pin)
        set_tensor(module, name, t)
    for name, b in module.named_buffers():
        if b.device != torch.device(device) and b.device.type != "meta":
            set_tensor(module, name, b.to(device))


def release(module: nn.Module) -> None:
    """Drop every parameter of `module` back to meta: its memory is freed with the last reference."""
    for name, _ in list(module.named_parameters()):
        set_tensor(module, name, torch.empty(_get(module, name).shape, device="meta"))


def _get(module: nn.Module, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return getattr(module, leaf)


def _non_persistent(module: nn.Module, name: str) -> set:
    *path, _ = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module._non_persistent_buffers_set


class _StopForward(Exception):
    pass


@dataclass
class Captured:
    """Block-0 inputs per batch, and the keyword arguments each block receives (per batch shape)."""
    inputs: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)  # batch size -> [kwargs of block i]


class _Recorder(nn.Module):
    """Stands in for block i during capture: records its call, passes hidden states through."""

    def __init__(self, index: int, sink: dict, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise StreamPruneError("unsupported architecture: decoder blocks are called with positional arguments")
        if self.index == 0:
            self.sink["input"] = hidden_states
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise _StopForward
        return hidden_states


def _portable(kwargs: dict) -> dict:
    """Keep what a replayed block call needs; drop caches and flags that would make it stateful."""
    out = {}
    for k, v in kwargs.items():
        if k in ("past_key_value", "past_key_values", "cache", "output_attentions", "use_cache"):
            continue
        out[k] = v
    out["use_cache"] = False
    return out


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, batches, device) -> Captured:
    """Run the model's own forward up to the blocks for every batch of token ids.

    Every block is replaced by a recorder, so masks and position embeddings come out exactly as the model
    computes them for each layer (Gemma's sliding vs full attention included), with no per-family code.
    Keyword arguments are recorded once per batch size: they depend only on the shape of the batch.
    """
    originals = list(blocks)
    sink: dict = {}
    n = len(blocks)
    for i in range(n):
        blocks[i] = _Recorder(i, sink, last=(i == n - 1))
    out = Captured()
    try:
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            if "input" not in sink or len(sink.get("kwargs", {})) != n:
                raise StreamPruneError("unsupported architecture: the forward pass did not reach every decoder block")
            out.inputs.append(sink["input"])
            b = ids.shape[0]
            if b not in out.kwargs:
                out.kwargs[b] = [_portable(sink["kwargs"][i]) for i in range(n)]
    finally:
        for i in range(n):
            blocks[i] = originals[i]
    return out


class StreamedModel:
    """A checkpoint's model code without its weights: the meta skeleton, its decoder blocks, and the means to
    assign the non-block parameters (embeddings, final norm, optionally the output head) for one step and drop
    them again. Shared by the prune job and the streamed evaluation."""

    def __init__(self, config, ckpt: Checkpoint, device, dtype, attn_implementation: str = "sdpa"):
        self.skeleton = build_skeleton(config, attn_implementation)
        self.blocks_name, self.blocks = find_blocks(self.skeleton, config)
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        head = self.skeleton.get_output_embeddings()
        self.head_prefix = next(n for n, m in self.skeleton.named_modules() if m is head) + "." if head is not None else None
        # the model's own decision, taken before any parameter is replaced: a tied skeleton shares the Parameter
        self.tied = head is not None and head.weight is self.skeleton.get_input_embeddings().weight

    def outside(self, name: str) -> bool:
        return not name.startswith(self.blocks_name + ".")

    def in_head(self, name: str) -> bool:
        return self.head_prefix is not None and name.startswith(self.head_prefix)

    def materialize_outside(self, with_head: bool) -> None:
        """Assign the non-block parameters; the output embeddings only if asked (tied: the input embedding)."""
        materialize(self.skeleton, "", self.ckpt, self.device, self.dtype,
                    skip=lambda n: not self.outside(n) or self.in_head(n))
        if not with_head or self.head_prefix is None:
            return
        head = self.skeleton.get_output_embeddings()
        if self.tied:
            set_tensor(head, "weight", self.skeleton.get_input_embeddings().weight)
        else:
            materialize(head, self.head_prefix, self.ckpt, self.device, self.dtype)

    def release_outside(self) -> None:
        """Back to meta; every alias of a tied parameter included (named_parameters would list it once)."""
        for name, p in list(self.skeleton.named_parameters(remove_duplicate=False)):
            if self.outside(name):
                set_tensor(self.skeleton, name, torch.empty(p.shape, device="meta"))

    def capture(self, batches) -> Captured:
        """Block-0 inputs and every block's call kwargs for these batches of token ids (see `capture`)."""
        self.materialize_outside(with_head=False)
        try:
            return capture(self.skeleton, self.blocks, batches, self.device)
        finally:
            self.release_outside()


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
