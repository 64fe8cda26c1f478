"""The model's own code, without its weights: a skeleton, its decoder blocks, and block-0 input capture.

The skeleton is built from config.json with every parameter on the meta device (no memory) while buffers
are real, so that non-persistent buffers such as rotary `inv_freq` or Gemma's `embed_scale` come out as the
model computes them. Parameters are assigned only for what one step needs and dropped back to meta after.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import StreamPruneError
from .memory import host_empty, trim
from .methods import check_prunable
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


def build_skeleton(config, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> nn.Module:
    """A causal-LM instance of the config's architecture with all parameters on meta. Built in `dtype` (the
    compute dtype), so that its buffers are exactly what `from_pretrained(dtype=...)` computes: Gemma's
    embed_scale is sqrt(hidden) rounded to that dtype, not to the checkpoint's."""
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
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **kwargs)
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


QUANTIZED_LAYOUTS = (  # tensor-name endings of quantized formats, and what to call them
    (".qweight", "GPTQ/AWQ packed integer weights (qweight, qzeros, scales)"),
    (".weight_scale_inv", "FP8 weights with block scales (weight_scale_inv)"),
    (".weight_scale", "quantized weights with scales (compressed-tensors weight_scale)"),
    (".absmax", "bitsandbytes 4-bit weights (absmax, quant_map)"),
    (".SCB", "bitsandbytes 8-bit weights (SCB)"),
    ("_blocks", "MXFP4 packed weights (_blocks, _scales)"),
)
PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def quantization_method(config) -> str | None:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    return str(q.get("quant_method") or q.get("format") or "unknown")


def layout_problem(config, tensors: dict, skeleton: nn.Module) -> str | None:
    """What makes a checkpoint unprunable as it is, said as what it is (not as 'tensor ... is missing')."""
    method = quantization_method(config)
    if method:
        return (f"a quantized checkpoint (quantization_config quant_method {method!r}); streamprune prunes "
                f"unquantized weights: use the unquantized release or dequantize it first")
    for ending, what in QUANTIZED_LAYOUTS:
        hit = next((n for n in tensors if n.endswith(ending)), None)
        if hit is not None:
            return f"holds {what}, e.g. {hit}, without a quantization_config; streamprune prunes unquantized weights"
    fused = any(p.dim() == 3 for n, p in skeleton.named_parameters() if ".experts." in n)
    hit = next((n for n in tensors if PER_EXPERT.search(n)), None)
    if fused and hit is not None:
        return (f"Mixture-of-Experts weights saved one tensor per expert (e.g. {hit}); this version reads experts "
                f"only in the fused layout the model uses in memory")
    return None


def exact_cast(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Does a value of dtype `stored` survive the trip to `compute` and back bit for bit?"""
    if stored == compute or not stored.is_floating_point:
        return True
    wide = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}
    return wide.get(compute, 0) > wide.get(stored, 9)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: one reduction (min and max propagate NaN and show Inf), no temporary of its size."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def to_host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` on the host in `dtype`: itself when it already is, else a block-lifetime copy (memory.host_empty)."""
    if t.device.type == "cpu" and t.dtype == dtype:
        return t.detach()
    out = host_empty(t.shape, dtype)
    out.copy_(t.detach())
    return out


class StreamedModel:
    """A checkpoint's model code without its weights: the meta skeleton and its decoder blocks, with the one
    path by which tensors go from the checkpoint into a module (cast to the compute dtype, on the device) and
    from a pruned block back to checkpoint tensors. Shared by the prune job and the streamed evaluation."""

    def __init__(self, config, ckpt: Checkpoint, device, dtype, attn_implementation: str = "sdpa"):
        self.config = config
        self.skeleton = build_skeleton(config, attn_implementation, dtype)
        self.blocks_name, self.blocks = find_blocks(self.skeleton, config)
        self.ckpt, self.device, self.dtype = ckpt, torch.device(device), dtype
        head = self.skeleton.get_output_embeddings()
        self.head_prefix = next(n for n, m in self.skeleton.named_modules() if m is head) + "." if head is not None else None
        # the model's own decision, taken before any parameter is replaced: a tied skeleton shares the Parameter
        self.tied = head is not None and head.weight is self.skeleton.get_input_embeddings().weight

    # ------------------------------------------------------------------ names

    def outside(self, name: str) -> bool:
        return not name.startswith(self.blocks_name + ".")

    def in_head(self, name: str) -> bool:
        return self.head_prefix is not None and name.startswith(self.head_prefix)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def block_names(self, i: int) -> list[str]:
        """The checkpoint's tensors under block i's prefix (all of them, whether the module knows them or not)."""
        prefix = self.block_prefix(i)
        return sorted(n for n in self.ckpt.tensors if n.startswith(prefix))

    def copy_names(self) -> list[str]:
        """Every tensor that is not in a decoder block: embeddings, final norm, head, unknown tensors, and layers
        under the block prefix beyond num_hidden_layers (DeepSeek-V3's multi-token-prediction layer). Copied."""
        in_blocks = {n for i in range(len(self.blocks)) for n in self.block_names(i)}
        return sorted(n for n in self.ckpt.tensors if n not in in_blocks)

    def copy_groups(self) -> list[list[str]]:
        """`copy_names` in name order, cut into shards of at most two blocks' bytes (plus one tensor): what is
        copied never holds more host memory than the block pipeline does."""
        names = self.copy_names()
        sizes = {n: self.ckpt.tensors[n].nbytes for n in names}
        block = max((sum(self.ckpt.tensors[n].nbytes for n in self.block_names(i)) for i in range(len(self.blocks))),
                    default=0)
        limit = 2 * block + max(sizes.values(), default=0)
        groups, size = [[]], 0
        for n in names:
            if groups[-1] and size + sizes[n] > limit:
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += sizes[n]
        return [g for g in groups if g]

    def check(self, structure=None) -> None:
        """Every tensor the model needs is in the checkpoint with the shape the config implies, and every
        block linear can take the N:M structure. The only shape check: nothing is read before it passes."""
        explained = layout_problem(self.config, self.ckpt.tensors, self.skeleton)
        if explained:
            raise StreamPruneError(f"{self.ckpt.path}: {explained}")
        shapes = {n: tuple(t.shape) for n, t in self.skeleton.named_parameters()}
        shapes.update((n, tuple(t.shape)) for n, t in self.skeleton.named_buffers())
        for name in checkpoint_names(self.skeleton):
            info = self.ckpt.tensors.get(name)
            if info is None and self.in_head(name) and self.tied:
                continue  # tied to the input embeddings: checkpoints may leave it out
            if info is None:
                untied = " (the config does not tie it to the input embeddings)" if self.in_head(name) else ""
                raise StreamPruneError(f"{self.ckpt.path}: tensor {name} is missing from the checkpoint{untied}")
            if info.shape != shapes[name]:
                raise StreamPruneError(f"{self.ckpt.path}: tensor {name} has shape {list(info.shape)}, "
                                       f"the config implies {list(shapes[name])}")
        if structure is not None:
            for lin in (m for m in self.blocks[0].modules() if isinstance(m, nn.Linear)):
                check_prunable(lin.in_features, structure)

    # ------------------------------------------------------------------ tensors in and out

    def _assign(self, module: nn.Module, prefix: str, host: dict, keep_if_inexact: bool) -> dict:
        """Assign module's checkpoint tensors from `host` (checkpoint name -> host tensor), cast to the compute
        dtype on the device. Returns the host tensors kept for writing back: those the compute dtype cannot
        return bit for bit (when asked) and buffers."""
        kept, params = {}, {n for n, _ in module.named_parameters()}
        for local in checkpoint_names(module):
            t = host[prefix + local]
            dtype = self.dtype if t.is_floating_point() else t.dtype
            if local not in params or (keep_if_inexact and not exact_cast(t.dtype, dtype)):
                kept[prefix + local] = t
            if self.device.type == "cpu" and t.dtype != dtype:
                value = host_empty(t.shape, dtype)
                value.copy_(t)
            else:
                value = t.to(self.device, dtype, non_blocking=True)
            if not all_finite(value):  # masks computed from NaN would be garbage that still exits 0
                if all_finite(t):
                    biggest = float(t.float().abs().max())
                    raise StreamPruneError(f"tensor {prefix + local} does not fit in {str(dtype).replace('torch.', '')} "
                                           f"(magnitudes up to {biggest:.3g}); use --dtype float32")
                raise StreamPruneError(f"{self.ckpt.path}: tensor {prefix + local} holds NaN or Inf values; a block "
                                       f"with them cannot be pruned: repair or re-export the checkpoint")
            set_tensor(module, local, value)
        for name, b in module.named_buffers():
            if b.device != self.device and b.device.type != "meta":
                set_tensor(module, name, b.to(self.device))
        return kept

    def load_block(self, i: int, host: dict | None = None) -> tuple[nn.Module, dict]:
        """Block i with its weights (from `host`, else read now). Returns (block, kept): `kept` holds the host
        tensors that `block_tensors` writes back as they are (buffers, unknown tensors, and tensors the compute
        dtype cannot represent exactly)."""
        prefix = self.block_prefix(i)
        if host is None:
            host, _ = self.read_block(i)
        block = self.blocks[i]
        kept = self._assign(block, prefix, host, keep_if_inexact=True)
        known = {prefix + n for n in checkpoint_names(block)}
        kept.update((n, t) for n, t in host.items() if n not in known)
        return block, kept

    def read_block(self, i: int) -> tuple[dict, str]:
        """Block i's tensors as stored, and their sha256 (names and bytes in name order). No torch compute here:
        this runs on the I/O thread, and a torch op there brings a second OpenMP team that spins against the
        forward passes' (measured: the SmolLM2 job 20% slower with a finiteness check here)."""
        pin, digest = self.device.type == "cuda", hashlib.sha256()
        return {name: self.ckpt.read(name, pin=pin, digest=digest) for name in self.block_names(i)}, digest.hexdigest()

    def block_tensors(self, i: int, block: nn.Module, kept: dict, masks: dict, recomputed: set) -> dict:
        """Block i's shard contents, every tensor in its own checkpoint dtype. A weight the pruner recomputed
        (`recomputed`, local names) comes from the module; a kept original is written as it was read, zeroed
        where `masks` says; any other parameter comes back from the module (its cast is exact). Consumes the
        block: each parameter is dropped as soon as its copy exists, so the block in the compute dtype and its
        outgoing copy are never both whole in memory."""
        prefix, out = self.block_prefix(i), {}
        params = dict(block.named_parameters())
        for name in self.block_names(i):
            local = name[len(prefix):]
            if local in params and (name not in kept or local in recomputed):
                out[name] = to_host(params[local], self.ckpt.tensors[name].dtype)
                set_tensor(block, local, torch.empty(params.pop(local).shape, device="meta"))
            else:
                t = kept[name]
                if local in masks:
                    t.masked_fill_(masks[local].to(t.device), 0)
                out[name] = t
        return out

    def release_block(self, i: int) -> None:
        release(self.blocks[i])
        trim()

    def materialize_outside(self, with_head: bool) -> None:
        """Assign the non-block parameters; the output embeddings only if asked (tied: the input embedding)."""
        names = [n for n in checkpoint_names(self.skeleton) if self.outside(n) and not self.in_head(n)]
        self._assign_names(self.skeleton, "", names)
        if not with_head or self.head_prefix is None:
            return
        head = self.skeleton.get_output_embeddings()
        if self.tied:
            set_tensor(head, "weight", self.skeleton.get_input_embeddings().weight)
        else:
            self._assign_names(head, self.head_prefix, checkpoint_names(head))

    def _assign_names(self, module: nn.Module, prefix: str, local_names: list[str]) -> None:
        for local in local_names:
            t = self.ckpt.read(prefix + local)
            dtype = self.dtype if t.is_floating_point() else t.dtype
            set_tensor(module, local, t.to(self.device, dtype))
        for name, b in module.named_buffers():
            if b.device != self.device and b.device.type != "meta":
                set_tensor(module, name, b.to(self.device))

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
