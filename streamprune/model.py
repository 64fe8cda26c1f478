"""The model's own code, without its weights: a skeleton, its decoder blocks, and block-0 input capture.

The skeleton is built from config.json with every parameter on the meta device (no memory) while buffers
are real, so that non-persistent buffers such as rotary `inv_freq` or Gemma's `embed_scale` come out as the
model computes them. Parameters are assigned only for what one step needs and dropped back to meta after.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import StreamPruneError
from .layout import Layout, check_scales, dequantize, fp8_block, mismatches, quantize, round_trips, scale_shape
from .memory import host_empty, trim
from .methods import check_prunable
from .shards import Checkpoint
from .dtypes import exact_cast
from .targets import set_tensor, targets


LARGE_ELEMENTS = 1 << 28  # 1 GiB of float32: only a parameter is this large (DeepSeek-V3's experts: 7.5B elements)


class _LargeOnMeta(TorchFunctionMode):
    """Tensors of more than LARGE_ELEMENTS made without a device go to meta: a parameter is created real and only
    then moved to meta (below), and one larger than the host (a DeepSeek-V3 experts tensor, 28 GiB in float32) is
    refused by the kernel's overcommit check before it could be moved."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.empty, torch.zeros, torch.ones) and kwargs.get("device") is None:
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            if all(isinstance(n, int) for n in size) and math.prod(size) > LARGE_ELEMENTS:
                kwargs = dict(kwargs, device="meta")
        return func(*args, **kwargs)


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
        with _LargeOnMeta():
            yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> nn.Module:
    """A causal-LM instance of the config's architecture with all parameters on meta. Built in `dtype` (the
    compute dtype), so that its buffers are exactly what `from_pretrained(dtype=...)` computes: Gemma's
    embed_scale is sqrt(hidden) rounded to that dtype, not to the checkpoint's. Mixture-of-Experts run their
    eager expert loop (each expert's matrices in their own matmul: statistics.py watches them); an architecture
    without sdpa attention (gpt-oss) gets eager attention."""
    from transformers import AutoModelForCausalLM

    arch = ",".join(getattr(config, "architectures", None) or [config.model_type])
    unsupported = (f"unsupported architecture {arch} (model_type {config.model_type!r}): streamprune prunes "
                   f"decoder-only causal language models")
    named = getattr(config, "architectures", None)
    if getattr(config, "is_encoder_decoder", False) or (named and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in named)):
        raise StreamPruneError(unsupported)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    for attn in dict.fromkeys([attn_implementation, "eager"]):
        try:
            with _params_on_meta():
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                         experts_implementation="eager", **kwargs)
            break
        except ValueError as e:
            if "attention implementation" in str(e) and attn != "eager":
                continue
            raise StreamPruneError(f"{unsupported} ({str(e).splitlines()[0][:120]})") from None
    acausal = next(((n, m) for n, m in model.named_modules() if getattr(m, "is_causal", True) is False), None)
    if acausal is not None:
        raise StreamPruneError(f"{unsupported}: its attention is not causal ({acausal[0]}: "
                               f"{type(acausal[1]).__name__})")
    return model.eval().requires_grad_(False)


def find_blocks(model: nn.Module, config) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list of same-class modules that contain linears, not nested
    in an element of another list (LongCat-Flash's per-layer `mlps` are not its blocks)."""
    n_layers = getattr(config, "num_hidden_layers", None)
    best = None
    lists = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer in lists):
            continue
        if len({type(m) for m in mod}) != 1 or not any(isinstance(x, nn.Linear) for x in mod[0].modules()):
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise StreamPruneError(f"unsupported architecture {type(model).__name__}: no list of decoder blocks found"
                               + (f" (num_hidden_layers {n_layers} blocks)" if n_layers is not None else ""))
    return best[0], best[1]


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

    def __init__(self, index: int, sink: dict, last: bool, family: str = "", block: nn.Module | None = None):
        super().__init__()
        self.index, self.sink, self.last, self.family = index, sink, last, family
        self.__dict__["_block"] = block  # not a submodule: attributes the model reads on its blocks come from it

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise StreamPruneError(f"unsupported architecture {self.family}: its decoder blocks take {len(args)} more "
                                   f"positional input(s) besides the hidden states (per-layer inputs); streamprune "
                                   f"replays a block from its keyword arguments")
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
        blocks[i] = _Recorder(i, sink, last=(i == n - 1), family=getattr(model.config, "model_type", ""),
                              block=originals[i])
    out = Captured()
    try:
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            except (ValueError, TypeError, RuntimeError, IndexError, AttributeError, KeyError) as e:
                if "input" not in sink:
                    raise
                family = getattr(model.config, "model_type", type(model).__name__)
                raise StreamPruneError(f"unsupported architecture {family}: its forward needs more from a decoder "
                                       f"block than the hidden states, which are all streamprune passes from block to "
                                       f"block ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
            if "input" not in sink or len(sink.get("kwargs", {})) != n:
                raise StreamPruneError("unsupported architecture: the forward pass did not reach every decoder block")
            h, width = sink["input"], getattr(model.config.get_text_config(), "hidden_size", None)
            if width and (h.dim() != 3 or h.shape[-1] != width):
                family = getattr(model.config, "model_type", type(model).__name__)
                raise StreamPruneError(f"unsupported architecture {family}: its decoder blocks pass hidden states of "
                                       f"shape {list(h.shape)} from block to block, not [batch, seq, hidden_size "
                                       f"{width}] (hyper-connections or a widened residual stream); streamprune "
                                       f"streams hidden-size activations between blocks")
            out.inputs.append(h)
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
    if method and not fp8_block(config):
        return (f"a quantized checkpoint (quantization_config quant_method {method!r}); streamprune prunes "
                f"unquantized weights and block-scaled FP8 (quant_method 'fp8' with weight_block_size): use the "
                f"unquantized release or dequantize it first")
    for ending, what in QUANTIZED_LAYOUTS:
        if method and ending == ".weight_scale_inv":
            continue  # block-scaled FP8, declared: read by layout.py
        hit = next((n for n in tensors if n.endswith(ending)), None)
        if hit is not None:
            return f"holds {what}, e.g. {hit}, without a quantization_config; streamprune prunes unquantized weights"
    return None


def experts_problem(blocks, family: str) -> str | None:
    """What makes a Mixture-of-Experts block unprunable, said as what it is: 3-D parameters of one module that
    disagree on the expert count (LongCat-Flash's zero-computation experts: routed indices beyond the experts
    that compute, gate_up_proj sized for all of them, down_proj for the computing ones only)."""
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            counts = {a: p.shape[0] for a, p in mod.named_parameters(recurse=False) if p.dim() == 3}
            if len(set(counts.values())) > 1:
                said = ", ".join(f"{a} {n}" for a, n in counts.items())
                return (f"{family}: block {i} {name}: its expert parameters disagree on the number of experts ({said}): "
                        f"experts beside the computing ones (zero or identity experts) are not supported")
    return None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: one reduction (min and max propagate NaN and show Inf), no temporary of its size."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


ZERO_CHUNK = 1 << 24  # elements compared at a time, so a huge weight never needs a same-sized bool tensor


def is_zero(t: torch.Tensor) -> torch.Tensor:
    """Where `t` is +0 or -0 (FP8 codes compared by their bits: eq is not defined for float8 on every device)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (t.view(torch.uint8) & 0x7F) == 0
    return t == 0


def count_zeros(t: torch.Tensor) -> int:
    """How many entries of `t` are zeros (is_zero), ZERO_CHUNK elements at a time."""
    flat = t.reshape(-1)
    return sum(int(is_zero(flat[k:k + ZERO_CHUNK]).sum()) for k in range(0, flat.numel(), ZERO_CHUNK))


def zero_codes(codes: torch.Tensor, mask: torch.Tensor) -> None:
    """FP8 codes written as they were read: +0 (0x00) where `mask` is set, and every zero +0 (as `quantize`)."""
    bits = codes.view(torch.uint8)
    bits.masked_fill_(mask | ((bits & 0x7F) == 0), 0)


def to_host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` on the host in `dtype`: itself when it already is, else a block-lifetime copy (memory.host_empty)."""
    if t.device.type == "cpu" and t.dtype == dtype:
        return t.detach()
    out = host_empty(t.shape, dtype)
    out.copy_(t.detach())
    return out


class StreamedModel:
    """A checkpoint's model code without its weights: the meta skeleton and its decoder blocks, with the one
    path by which tensors go from the checkpoint into a module (through the checkpoint's layout, cast to the
    compute dtype, on the device) and from a pruned block back to checkpoint tensors in the checkpoint's own
    layout and dtypes. Shared by the prune job and the streamed evaluation."""

    def __init__(self, config, ckpt: Checkpoint, device, dtype, attn_implementation: str = "sdpa"):
        self.config = config
        self.skeleton = build_skeleton(config, attn_implementation, dtype)
        self.blocks_name, self.blocks = find_blocks(self.skeleton, config)
        self.ckpt, self.device, self.dtype = ckpt, torch.device(device), dtype
        head = self.skeleton.get_output_embeddings()
        self.head_prefix = next(n for n, m in self.skeleton.named_modules() if m is head) + "." if head is not None else None
        # the model's own decision, taken before any parameter is replaced: a tied skeleton shares the Parameter
        self.tied = head is not None and head.weight is self.skeleton.get_input_embeddings().weight
        self.shapes = {n: tuple(t.shape) for n, t in self.skeleton.named_parameters()}
        self.shapes.update((n, tuple(t.shape)) for n, t in self.skeleton.named_buffers())
        # what the model computes in floating point (every parameter; buffers by their own dtype: an integer or
        # boolean buffer stays as stored)
        self.floating = {n for n, t in self.skeleton.named_parameters()}
        self.floating.update(n for n, t in self.skeleton.named_buffers() if t.is_floating_point())
        needed = {n: self.shapes[n] for n in checkpoint_names(self.skeleton)}
        self.layout = Layout(config, needed, {n: (t.dtype, t.shape) for n, t in ckpt.tensors.items()}, self.skeleton)
        self.fp8_reencode: str | None = None  # the method, when it writes updated weights (see _dequantized)

    # ------------------------------------------------------------------ names

    def outside(self, name: str) -> bool:
        return not name.startswith(self.blocks_name + ".")

    def in_head(self, name: str) -> bool:
        return self.head_prefix is not None and name.startswith(self.head_prefix)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def block_names(self, i: int) -> list[str]:
        """The checkpoint's tensors under block i's prefix as the model names them (all of them, whether the module
        knows them or not)."""
        prefix = self.block_prefix(i)
        return sorted(n for n, model_name in self.layout.model_names.items() if model_name.startswith(prefix))

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
        """Every tensor the model needs is in the checkpoint (directly or through its layout) with the shape the
        config implies (FP8 scales: one finite float per tile), and every block's linears and experts can take the
        N:M structure. The only shape check: nothing but FP8 scales is read before it passes."""
        explained = layout_problem(self.config, self.ckpt.tensors, self.skeleton)
        if explained:
            raise StreamPruneError(f"{self.ckpt.path}: {explained}")
        for name in checkpoint_names(self.skeleton):
            pieces = self.layout.pieces.get(name)
            if pieces is None and self.in_head(name) and self.tied:
                continue  # tied to the input embeddings: checkpoints may leave it out
            if pieces is None:
                hit = next((n for n in self.ckpt.tensors if PER_EXPERT.search(n)), None)
                why = (" (the config does not tie it to the input embeddings)" if self.in_head(name) else
                       f" (experts are stored one by one, e.g. {hit}, and transformers has no conversion rule "
                       f"for {self.config.model_type})" if hit and ".experts." in name else "")
                raise StreamPruneError(f"{self.ckpt.path}: tensor {name} is missing from the checkpoint{why}")
            if not self.outside(name):
                prefix = self.block_prefix(int(name[len(self.blocks_name) + 1:].split(".", 1)[0]))
                away = next((p.name for p in pieces if not p.name.startswith(prefix)), None)
                if away is not None:
                    raise StreamPruneError(f"{self.ckpt.path}: the checkpoint stores block tensor {name} as {away}, "
                                           f"outside the block's prefix {prefix}; streamprune reads a block by its "
                                           f"prefix: not supported for {self.config.model_type}")
            whole = torch.empty(self.shapes[name], device="meta")
            for p in pieces:
                stored = self.ckpt.tensors[p.name].dtype
                if name in self.floating and not p.scale and not stored.is_floating_point:
                    raise StreamPruneError(
                        f"{self.ckpt.path}: tensor {p.name} is stored as {str(stored).replace('torch.', '')}, but the "
                        f"model computes with it in floating point and no quantization_config says how to read it; "
                        f"use the unquantized release or dequantize it first")
                want, got = tuple(p.region(whole).shape), tuple(self.ckpt.tensors[p.name].shape)
                if want != got:
                    raise StreamPruneError(f"{self.ckpt.path}: tensor {p.name} has shape {list(got)}, the config "
                                           f"implies {list(want)}")
                if p.scale:
                    self._check_scale_tensor(p, got)
                    check_scales(p.scale, self.ckpt.read(p.scale))  # small: a float per tile; read again per block
        if structure is not None and not structure.width:  # width's own shape checks: width.check_model
            for block in self.blocks:
                for t in targets(block):
                    check_prunable(t.in_features, structure)

    def _check_scale_tensor(self, p, shape: tuple) -> None:
        """An FP8 weight's scales: floats, one per tile of `weight_block_size` (ceil(shape / block))."""
        info = self.ckpt.tensors[p.scale]
        want = scale_shape(shape, p.block)
        if not info.dtype.is_floating_point or info.dtype.itemsize < 2 or tuple(info.shape) != want:
            raise StreamPruneError(
                f"{self.ckpt.path}: tensor {p.scale} is {str(info.dtype).replace('torch.', '')} {list(info.shape)}; "
                f"weight_block_size {list(p.block)} over {p.name} {list(shape)} implies float scales of shape "
                f"{list(want)} (one per tile): the scales do not match the config's tiles")

    def _dequantized(self, p, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     kept: dict | None) -> torch.Tensor:
        """FP8 codes x their tiles' scales in `dtype`. With `kept` (a prune): when the compute dtype does not
        give back every code (float16 underflows codes x small scales; a tile whose scale is 0 holding non-zero
        codes; a -0 code), the codes go to `kept` and are written as they are, +0 where pruned, so the compute
        dtype only decides the mask. A method that writes its own updated weights (`fp8_reencode`) re-encodes them from the
        compute dtype: refused there, naming the tensor."""
        check_scales(p.scale, scale)
        value = dequantize(codes, scale, p.block, dtype)
        if kept is not None and not round_trips(value, codes, scale, p.block):
            if self.fp8_reencode:
                bad = mismatches(value, codes, scale, p.block, strict=False)
                if bad:
                    raise StreamPruneError(
                        f"tensor {p.name}: {bad} of its FP8 values (codes x scales) do not survive "
                        f"{str(dtype).replace('torch.', '')} (underflow or overflow), and --method "
                        f"{self.fp8_reencode} writes its updated weights from the compute dtype: use --dtype float32")
            kept[p.name] = codes
        return value

    # ------------------------------------------------------------------ tensors in and out

    def _group_pieces(self, name: str, host: dict, group: tuple) -> list:
        """(piece, its source, the source's FP8 scales or None) of experts `group` = (first, stop) of parameter
        `name`, each piece re-indexed into a tensor holding only those experts: a per-expert tensor as it is, a
        fused one (and its scales) sliced."""
        g0, g1 = group
        out = []
        for p in self.layout.pieces[name]:
            if p.expert is None:
                out.append((p, host[p.name][g0:g1], host[p.scale][g0:g1] if p.scale else None))
            elif g0 <= p.expert < g1:
                out.append((replace(p, expert=p.expert - g0), host[p.name], host[p.scale] if p.scale else None))
        return out

    def group_value(self, name: str, host: dict, group: tuple) -> torch.Tensor:
        """Experts `group` = (first, stop) of parameter `name` in the compute dtype on the device, from the host
        tensors of the block (which stay: groups.py writes the group back into them)."""
        pieces = self._group_pieces(name, host, group)
        first = pieces[0][1]
        dtype = self.dtype if (first.is_floating_point() or pieces[0][0].scale) else first.dtype
        value = torch.empty((group[1] - group[0],) + tuple(self.shapes[name][1:]), dtype=dtype, device=self.device)
        for p, t, scale in pieces:
            if p.scale:
                t = self._dequantized(p, t, scale, dtype, {} if self.fp8_reencode else None)  # codes stay
            p.region(value).copy_(t, non_blocking=True)
        if not all_finite(value):
            raise StreamPruneError(f"{self.ckpt.path}: tensor {name} holds NaN or Inf values (or does not fit in "
                                   f"{str(dtype).replace('torch.', '')}); a block with them cannot be pruned")
        return value

    def inexact_pieces(self, name: str, host: dict) -> bool:
        """Is some piece of `name` written from its original rather than from the computed value: FP8 codes, or
        a tensor that does not survive the trip to the compute dtype and back? Its mask is needed."""
        return any(p.scale or not exact_cast(host[p.name].dtype, self.dtype) for p in self.layout.pieces[name])

    def store_group(self, name: str, host: dict, group: tuple, value: torch.Tensor, mask, recomputed: bool) -> None:
        """Experts `group` of parameter `name`, pruned, back into the block's host tensors in the checkpoint's
        layout and dtypes, by block_tensors' rules: FP8 codes as they are, +0 where `mask` says (re-encoded with
        their scales when recomputed), an original the compute dtype cannot represent zeroed where `mask` says
        (unless recomputed), else the computed values."""
        for p, t, scale in self._group_pieces(name, host, group):
            if p.scale and not recomputed:
                zero_codes(t, p.region(mask).to(t.device))  # in place: a fused tensor's slice too
            elif p.scale:
                t.copy_(quantize(p.region(value).cpu(), scale, p.block))
            elif not exact_cast(t.dtype, value.dtype) and not recomputed:
                t.masked_fill_(p.region(mask).to(t.device), 0)
            else:
                t.copy_(p.region(value))

    def _value(self, name: str, host: dict, kept: dict | None) -> torch.Tensor:
        """Parameter `name` in the compute dtype on the device, assembled from its pieces in `host`. Pieces the
        compute dtype cannot give back bit for bit go to `kept` (when given)."""
        pieces = self.layout.pieces[name]
        first = host[pieces[0].name]
        dtype = self.dtype if (first.is_floating_point() or pieces[0].scale) else first.dtype
        if len(pieces) == 1 and pieces[0].expert is None and not pieces[0].scale:
            if kept is not None and not exact_cast(first.dtype, dtype):
                kept[pieces[0].name] = first
            if self.device.type == "cpu" and first.dtype != dtype:
                value = host_empty(first.shape, dtype)
                value.copy_(first)
            else:
                value = first.to(self.device, dtype, non_blocking=True)
        else:
            value = (host_empty(self.shapes[name], dtype) if self.device.type == "cpu" else
                     torch.empty(self.shapes[name], dtype=dtype, device=self.device))
            for p in pieces:
                t = host[p.name]
                if p.scale:
                    t = self._dequantized(p, t, host[p.scale], dtype, kept)
                elif kept is not None and not exact_cast(t.dtype, dtype):
                    kept[p.name] = t
                p.region(value).copy_(t, non_blocking=True)
        if not all_finite(value):  # masks computed from NaN would be garbage that still exits 0
            if all(all_finite(host[p.name]) for p in pieces if not p.scale):
                raise StreamPruneError(f"tensor {name} does not fit in {str(dtype).replace('torch.', '')}; use "
                                       f"--dtype float32")
            raise StreamPruneError(f"{self.ckpt.path}: tensor {name} holds NaN or Inf values; a block with them "
                                   f"cannot be pruned: repair or re-export the checkpoint")
        return value

    def load_block(self, i: int, host: dict | None = None, grouped: frozenset = frozenset()) -> tuple[nn.Module, dict]:
        """Block i with its weights (from `host`, which it consumes, else read now). Returns (block, kept):
        `kept` holds the host tensors that `block_tensors` writes back as they are (FP8 scales, unknown tensors,
        persistent buffers, and tensors the compute dtype cannot represent exactly). Each host tensor is dropped
        as soon as its parameter exists in the compute dtype: the block as read and as computed are never both
        whole in memory. Parameters named in `grouped` (local names: experts streamed in groups) stay on meta,
        their host tensors in `kept`."""
        prefix = self.block_prefix(i)
        if host is None:
            host, _ = self.read_block(i)
        block, kept = self.blocks[i], {}
        params = {n for n, _ in block.named_parameters()} - grouped
        for local in checkpoint_names(block):
            if local in grouped:
                continue
            set_tensor(block, local, self._value(prefix + local, host, kept))
            if local in params:
                for p in self.layout.pieces[prefix + local]:
                    host.pop(p.name, None)
        for name, b in block.named_buffers():
            if b.device != self.device and b.device.type != "meta":
                set_tensor(block, name, b.to(self.device))
        kept.update(host)  # what no parameter used: scales, buffers, unknown tensors
        host.clear()
        return block, kept

    def kept_params(self, i: int, kept: dict) -> set[str]:
        """Block i's parameters (local names) some of whose pieces `load_block` kept: their masks are needed."""
        prefix = self.block_prefix(i)
        return {local for local, _ in self.blocks[i].named_parameters()
                if any(p.name in kept for p in self.layout.pieces.get(prefix + local, []))}

    def read_block(self, i: int) -> tuple[dict, str]:
        """Block i's tensors as stored, and their sha256 (names and bytes in name order). No torch compute here:
        this runs on the I/O thread, and a torch op there brings a second OpenMP team that spins against the
        forward passes' (measured: the SmolLM2 job 20% slower with a finiteness check here)."""
        pin, digest = self.device.type == "cuda", hashlib.sha256()
        return {name: self.ckpt.read(name, pin=pin, digest=digest) for name in self.block_names(i)}, digest.hexdigest()

    def block_tensors(self, i: int, block: nn.Module, kept: dict, masks: dict, recomputed: set,
                      grouped: frozenset = frozenset()) -> dict:
        """Block i's shard contents in the checkpoint's own layout and dtypes. A parameter comes back from the
        module (its cast is exact, or the pruner recomputed it; FP8 codes are re-encoded with their own scales);
        a kept original (FP8 codes too) is written as it was read, zeroed where `masks` (local parameter name ->
        mask) says.
        Consumes the block: each parameter is dropped once its pieces are copied, so the block in the compute
        dtype and its outgoing copy are never both whole in memory."""
        prefix, out = self.block_prefix(i), {}
        params = {n: p for n, p in block.named_parameters() if n not in grouped}  # grouped: final in `kept`
        owner = {p.name: (local, p) for local in params for p in self.layout.pieces.get(prefix + local, [])}
        left = {local: len(self.layout.pieces.get(prefix + local, [])) for local in params}
        for name in self.block_names(i):
            if name not in owner:
                out[name] = kept[name]  # scales, buffers, tensors the model does not know: as read
                continue
            local, piece = owner[name]
            if name in kept and local not in recomputed:
                t = kept[name]
                if local in masks and piece.scale:  # FP8 codes; without a mask (not pruned) as read
                    zero_codes(t, piece.region(masks[local]).to(t.device))
                elif local in masks:
                    t.masked_fill_(piece.region(masks[local]).to(t.device), 0)
                out[name] = t
            elif piece.scale:
                out[name] = quantize(piece.region(params[local]).cpu(), kept[piece.scale], piece.block)
            else:
                out[name] = to_host(piece.region(params[local]), self.ckpt.tensors[name].dtype).contiguous()
            left[local] -= 1
            if not left[local]:
                set_tensor(block, local, torch.empty(params.pop(local).shape, device="meta"))
        return out

    def written_zeros(self, i: int, tensors: dict) -> dict:
        """{target label: zeros} of block i's pruned weights in `tensors` (block_tensors' output, what is written):
        the zeros on disk, as `report` counts them, whatever made them (the masks, or the data: dead input
        channels that SparseGPT and ADMM zero, zeros already in the input)."""
        prefix = self.block_prefix(i)
        return {t.label: sum(count_zeros(tensors[p.name]) for p in self.layout.pieces[prefix + t.name])
                for t in targets(self.blocks[i])}

    def release_block(self, i: int) -> None:
        release(self.blocks[i])
        trim()

    def materialize_outside(self, with_head: bool) -> None:
        """Assign the non-block parameters; the output embeddings only if asked (tied: the input embedding)."""
        names = [n for n in checkpoint_names(self.skeleton) if self.outside(n) and not self.in_head(n)]
        self._assign_names(self.skeleton, names)
        if not with_head or self.head_prefix is None:
            return
        head = self.skeleton.get_output_embeddings()
        if self.tied:
            set_tensor(head, "weight", self.skeleton.get_input_embeddings().weight)
        else:
            self._assign_names(self.skeleton, [self.head_prefix + n for n in checkpoint_names(head)])

    def _assign_names(self, module: nn.Module, names: list[str]) -> None:
        for name in names:
            host = {n: self.ckpt.read(n) for n in self.layout.sources(name)}
            set_tensor(module, name, self._value(name, host, None))
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
