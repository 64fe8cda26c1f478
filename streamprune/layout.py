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
scale), which gives back every unpruned code exactly (the compute dtype has more mantissa bits than e4m3) and
+0 where pruned. The scales themselves are copied unchanged.
"""

from __future__ import annotations

import re
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
    return (weight.float() / _tiles(scale, block, weight.shape)).to(FP8)


class Layout:
    """For every parameter (and persistent buffer) the model needs: the checkpoint tensors that hold it."""

    def __init__(self, config, needed: dict, available: dict):
        """`needed`: parameter name -> shape; `available`: checkpoint tensor name -> (dtype, shape)."""
        self.block = fp8_block(config)
        self.pieces: dict[str, list[Piece]] = {}
        renamed = self._renamed(config, available)  # name as the model would call it -> checkpoint name
        converters = self._converters(config)
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
    def _mapping(config):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        return get_checkpoint_conversion_mapping(config.model_type) or []

    def _renamed(self, config, available: dict) -> dict:
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in self._mapping(config) if isinstance(t, WeightRenaming)]
        out = {}
        for name in available:
            new = name
            for t in renamings:
                for src, dst in zip(t._original_source_patterns, t._original_target_patterns):
                    new = re.sub(src, dst, new)
            if new != name:
                out[new] = name
        return out

    def _converters(self, config) -> list:
        from transformers.core_model_loading import WeightConverter

        return [t for t in self._mapping(config) if isinstance(t, WeightConverter)]

    def _convert(self, conv, name: str, shape: tuple, renamed: dict, available: dict) -> list[Piece] | None:
        """Pieces of parameter `name` under one converter, or None when it does not apply."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        targets = [t.lstrip(".") for t in conv._original_target_patterns]
        if len(targets) != 1 or not name.endswith(targets[0]):
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

    def sources(self, name: str) -> list[str]:
        """The checkpoint tensors parameter `name` is read from (FP8 scales included)."""
        return [n for p in self.pieces.get(name, []) for n in ((p.name, p.scale) if p.scale else (p.name,))]

    def fused(self, name: str) -> bool:
        pieces = self.pieces.get(name, [])
        return len(pieces) != 1 or pieces[0].expert is not None
