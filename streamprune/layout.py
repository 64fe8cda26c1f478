"""How a checkpoint's tensors map onto the model's parameters, and back.

Most checkpoints hold every parameter under its own name. Mixture-of-Experts checkpoints usually store each
expert's matrices one by one (`mlp.experts.7.gate_proj.weight`; Mixtral `block_sparse_moe.experts.7.w1.weight`)
where transformers 5 holds them fused (`mlp.experts.gate_up_proj`, [experts, 2 x intermediate, hidden]). The
rules are transformers' own checkpoint conversion mapping (`get_checkpoint_conversion_mapping(model_type)`):
renamings, and converters that stack a module list along dim 0 (MergeModulelist) and concatenate the stacks along
a later dim (Concatenate). Each source tensor is a `Piece`: read into its slice of the fused parameter and written
back from that slice under its own name, so the output keeps the input's layout. Other conversion operations
are refused by name.

FP8 checkpoints (`quantization_config` quant_method "fp8" with `weight_block_size`): a weight stored as
float8_e4m3fn codes with a float32 `weight_scale_inv` per tile is dequantized to the compute dtype (codes x
scale, the scale repeated over its tile) and written back as codes with the same scales: code = fp8(weight /
scale), which gives back every unpruned code exactly when the compute dtype holds codes x scale (float32 and
bfloat16 have e4m3's range and more mantissa bits; float16 underflows below 6e-8) and +0 where pruned. Where it
does not (`round_trips`), model.py writes the input's codes themselves, +0 where pruned. A tile whose scale is 0
holds only zeros: its codes re-encode to +0. Every zero code is +0 (0x00), never -0 (0x80), a negative scale's
tile included. The scales themselves are copied unchanged; `check_scales` refuses those no value can be
computed from (NaN, Inf, or codes x scale beyond float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StreamPruneError

FP8 = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor and the part of a model parameter it holds: all of it (`expert` None) or expert
    `expert`'s rows `start:stop` along dim `dim` of the parameter (dim counted in the fused parameter)."""
    name: str
    expert: int | None = None
    dim: int = 1
    start: int = 0
    stop: int | None = None
    scale: str | None = None           # FP8: the float32 scale tensor (weight_scale_inv) of these codes
    block: tuple | None = None         # FP8: the tile size the scales cover

    def region(self, param: torch.Tensor) -> torch.Tensor:
        """The view of `param` this piece fills."""
        if self.expert is None:
            return param
        view = param[self.expert]
        if self.stop is not None:
            view = view.narrow(self.dim - 1, self.start, self.stop - self.start)
        return view


def fp8_block(config) -> tuple | None:
    """The FP8 tile size when the config declares block-scaled FP8 weights, else None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    if q.get("quant_method") == "fp8" and q.get("weight_block_size"):
        return tuple(int(x) for x in q["weight_block_size"])
    return None


def _tiles(scale: torch.Tensor, block: tuple, shape) -> torch.Tensor:
    """The scale of every entry: tiles over the last two dims (a fused experts tensor has one grid per expert)."""
    rows, cols = shape[-2:]
    return scale.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * _tiles(scale, block, codes.shape)).to(dtype)


def quantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple) -> torch.Tensor:
    """FP8 codes of `weight` in its tiles' scales (saturated at +-448), +0 wherever the code is a zero of either
    sign or the tile's scale is 0 (x / 0 would be a NaN or saturated code; such a tile holds only zeros)."""
    tiles = _tiles(scale, block, weight.shape)
    codes = (weight.float() / tiles).to(FP8)
    bits = codes.view(torch.uint8)
    bits.masked_fill_(((bits & 0x7F) == 0) | (tiles == 0), 0)   # -0 (a negative scale's +0, an underflow) -> +0
    return codes


def mismatches(value: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, block: tuple,
               strict: bool = True) -> int:
    """How many of `codes` the compute-dtype `value` (their dequantization) does not re-encode to: bit for bit
    when `strict` (a -0 code, which `quantize` makes +0, counts; so does a non-zero code in a tile whose scale is
    0), else zeros of either sign alike and tiles whose scale is 0 left out (any code there means 0)."""
    got, want = quantize(value, scale, block).view(torch.uint8), codes.view(torch.uint8)
    same = got == want
    if not strict:
        same |= (((got | want) & 0x7F) == 0) | (_tiles(scale, block, codes.shape) == 0)
    return int((~same).sum())


def round_trips(value: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, block: tuple) -> bool:
    """Does `value` (the codes dequantized into the compute dtype) re-encode to `codes` bit for bit? Without a
    pass over the values when every non-zero code x scale (|code| from 2^-9 to 448) is a normal number of the
    compute dtype and no code is -0: rounding to it (at most 2^-8 relative, bfloat16) then stays within half an
    e4m3 step (at least 2^-5 relative; 2^-10 absolute below 2^-6) of the code."""
    s = scale.float().abs()
    info = torch.finfo(value.dtype)
    if (s.numel() and float(s.min()) * 2 ** -9 >= info.tiny and float(s.max()) * 448 <= info.max
            and not bool((codes.view(torch.uint8) == 0x80).any())):
        return True
    return not mismatches(value, codes, scale, block)


def check_scales(name: str, scale: torch.Tensor) -> None:
    """Scales every value can be computed from: finite, and with codes x scale (|code| <= 448) within float32.
    A zero or negative scale is a valid (if odd) tile: codes x scale is what transformers' loader computes."""
    s = scale.float()
    bad = ~torch.isfinite(s) | (s.abs() > torch.finfo(torch.float32).max / 448)
    if bool(bad.any()):
        where = tuple(int(x) for x in bad.nonzero()[0])
        value = float(s[where])
        why = ("is not finite" if value != value or abs(value) == float("inf") else
               "times the largest FP8 code (448) exceeds float32")
        raise StreamPruneError(f"tensor {name}: the scale of tile {where} is {value!r} and {why}; a block with it "
                               f"cannot be pruned: repair or re-export the checkpoint")


def scale_shape(shape: tuple, block: tuple) -> tuple:
    """The shape of a weight's scale tensor: one scale per tile of its last two dims, ceil(shape / block)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


class Layout:
    """For every parameter (and persistent buffer) the model needs: the checkpoint tensors that hold it. The rules
    are the model's own (`get_model_conversion_mapping`: by class, then model_type, plus transformers' legacy
    renamings): GPT-NeoX's `embed_out` is its `lm_head`, Mixtral's `block_sparse_moe` its `mlp`."""

    def __init__(self, config, needed: dict, available: dict, model=None):
        """`needed`: parameter name -> shape; `available`: checkpoint tensor name -> (dtype, shape); `model`: the
        skeleton whose conversion rules apply (else those of config.model_type)."""
        self.block = fp8_block(config)
        self.pieces: dict[str, list[Piece]] = {}
        self._rules = self._mapping(config, model)
        # checkpoint name -> the name the model calls it (transformers' renamings, and its base-model prefix rule)
        self.model_names = self._model_names(available, needed, getattr(model, "base_model_prefix", None))
        renamed = {new: name for name, new in self.model_names.items() if new != name}
        converters = self._converters()
        for name, shape in needed.items():
            if name in available:
                self.pieces[name] = [self._piece(name, available)]
            elif name in renamed:
                self.pieces[name] = [self._piece(renamed[name], available)]
            else:
                for conv in converters:
                    pieces = self._convert(conv, name, shape, renamed, available)
                    if pieces:
                        self.pieces[name] = pieces
                        break

    def _piece(self, name: str, available: dict, **kw) -> Piece:
        if self.block and available[name][0] == FP8 and name + SCALE_SUFFIX in available:
            return Piece(name, scale=name + SCALE_SUFFIX, block=self.block, **kw)
        return Piece(name, **kw)

    @staticmethod
    def _mapping(config, model) -> list:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping

        if model is not None:
            return get_model_conversion_mapping(model)
        return get_checkpoint_conversion_mapping(config.model_type) or []

    def _model_names(self, available: dict, needed: dict, base_model_prefix: str | None) -> dict:
        from transformers.core_model_loading import WeightConverter, rename_source_key

        renamings = [t for t in self._rules if not isinstance(t, WeightConverter)]
        meta = dict.fromkeys(needed, True) if base_model_prefix else None
        return {name: rename_source_key(name, renamings, [], base_model_prefix, meta)[0] for name in available}

    def _converters(self) -> list:
        from transformers.core_model_loading import WeightConverter

        return [t for t in self._rules if isinstance(t, WeightConverter)]

    def _convert(self, conv, name: str, shape: tuple, renamed: dict, available: dict) -> list[Piece] | None:
        """Pieces of parameter `name` under one converter, or None when it does not apply."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        targets = [t.lstrip(".") for t in conv._original_target_patterns]
        if len(targets) != 1:
            self._check_split(conv, name, targets, renamed, available)
            return None
        if not name.endswith(targets[0]):
            return None
        ops = conv.operations
        if not (ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and
                all(isinstance(o, Concatenate) and o.dim >= 1 for o in ops[1:]) and len(ops) <= 2):
            raise StreamPruneError(f"parameter {name}: the checkpoint stores it through conversion operations "
                                   f"{[type(o).__name__ for o in ops]}, which streamprune does not read")
        prefix = name[: len(name) - len(targets[0])]
        dim = ops[1].dim if len(ops) == 2 else 1
        pieces, start = [], 0
        for pattern in conv._original_source_patterns:
            stop = None
            for e in range(shape[0]):
                model_name = prefix + pattern.lstrip(".").replace("*", str(e))
                source = model_name if model_name in available else renamed.get(model_name)
                if source is None:
                    return None
                rows = available[source][1][dim - 1]
                stop = start + rows
                pieces.append(self._piece(source, available, expert=e, dim=dim, start=start,
                                          stop=stop if len(ops) == 2 else None))
            start = stop
        return pieces

    @staticmethod
    def _check_split(conv, name: str, targets: list, renamed: dict, available: dict) -> None:
        """A converter that fills several parameters from one checkpoint tensor (a fused `query_key_value` split
        into q/k/v): when `name` is one of them and the checkpoint holds the fused tensor, say so (not 'missing')."""
        for target in targets:
            if f".{target}." not in f".{name}":
                continue
            for source in conv._original_source_patterns:
                fused = f".{name}".replace(f".{target}.", f".{source.lstrip('.')}.", 1)[1:]
                if fused in available or fused in renamed:
                    raise StreamPruneError(
                        f"parameter {name}: the checkpoint stores it inside {renamed.get(fused, fused)} through "
                        f"conversion operations {[type(o).__name__ for o in conv.operations]}, which streamprune "
                        f"does not read")

    def sources(self, name: str) -> list[str]:
        """The checkpoint tensors parameter `name` is read from (FP8 scales included)."""
        return [n for p in self.pieces.get(name, []) for n in ((p.name, p.scale) if p.scale else (p.name,))]

    def fused(self, name: str) -> bool:
        pieces = self.pieces.get(name, [])
        return len(pieces) != 1 or pieces[0].expert is not None
