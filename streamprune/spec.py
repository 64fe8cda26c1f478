"""What a job is, resolved once: options checked, config read, device, dtypes and sequence length chosen.

`prune`, `eval` and `plan` all start here, so an option means the same thing and is refused with the same
line everywhere. Everything in this module is immutable once resolved; nothing here changes process state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from .choices import DTYPES, Structure
from .errors import StreamPruneError
from .modelinfo import ModelInfo

if TYPE_CHECKING:  # torch is imported where it is used: PruneOptions.check_values runs before it is loaded
    import torch

    from .methods import Pruner


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    check_dtype_name(name)
    return getattr(torch, DTYPES[name])


def check_dtype_name(name) -> None:
    if isinstance(name, str) and name not in DTYPES:
        raise StreamPruneError(f"--dtype {name!r}: choose float32, bfloat16 or float16")


def slow_on_cpu(device, dtype) -> str | None:
    """A warning for a half-precision compute dtype on the CPU, which runs it far slower than float32."""
    import torch

    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return (f"streamprune: warning: --dtype {str(dtype)[6:]} on the CPU is slow (without half-precision matrix "
                f"units a CPU runs its matrix products tens of times slower than float32, the CPU default)")
    return None


def compute_dtype(requested: torch.dtype | None, checkpoint: torch.dtype, device: torch.device) -> torch.dtype:
    """The requested dtype, else the checkpoint's on a GPU and float32 on a CPU (bf16 matmuls are slow there)."""
    import torch

    return requested or (checkpoint if device.type == "cuda" else torch.float32)


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """`auto` is CUDA when present; under torchrun `auto`/`cuda` mean this rank's own GPU (LOCAL_RANK)."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise StreamPruneError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamPruneError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
        if dev.index >= torch.cuda.device_count():
            raise StreamPruneError(f"--device {spec}: no such GPU (this machine has {torch.cuda.device_count()})")
    elif dev.type != "cpu":
        raise StreamPruneError(f"--device {spec}: only cpu and cuda devices are supported")
    return dev


class PruneOptions:
    """A prune job's options: every declared option (options.py, and the registered methods' and profiles' own),
    each its default unless given. Immutable; `replace` gives a changed copy."""
    __slots__ = ("_values",)

    def __init__(self, **values):
        from .options import declared

        known = declared()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise StreamPruneError(f"unknown option {unknown[0]!r}")
        object.__setattr__(self, "_values", {name: values.get(name, o.default) for name, o in known.items()})

    @classmethod
    def from_dict(cls, options: dict) -> "PruneOptions":
        return cls(**options)

    def __getattr__(self, name):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"PruneOptions has no option {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("PruneOptions is immutable: use .replace(...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, PruneOptions) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return "PruneOptions(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def replace(self, **changes) -> "PruneOptions":
        return PruneOptions(**{**self._values, **changes})

    def as_dict(self) -> dict:
        return dict(self._values)

    def pruner(self) -> Pruner:
        """The method with its own options, and the refinement if any: what the job runs and the plan counts."""
        from .methods import Pruner, method_named, refinement_named

        return Pruner(method_named(self.method, self), refinement_named(self.refine, self) if self.refine else None)

    def check(self) -> None:
        """Every option on its own and in combination; one line for the first problem."""
        from .methods import method_named, profile_named

        self.check_values()
        structure = Structure.parse(self.structure)
        method = method_named(self.method, self)
        if self.refine and not method.refinable:
            raise StreamPruneError(f"--refine {self.refine} refines a wanda or ria mask, not --method {self.method}")
        profile_named(self.sparsity_profile, self).check(self.sparsity, structure, method)

    def check_values(self) -> None:
        """The checks that need neither torch nor the model: the CLI runs them before importing either."""
        from .methods import METHODS, PROFILES, REFINES
        from .options import declared

        for name, o in declared().items():
            value = self._values[name]
            if o.type in (int, float, bool) and value is not None and not (
                    isinstance(value, bool) if o.type is bool else
                    isinstance(value, (int, float) if o.type is float else int) and not isinstance(value, bool)):
                raise StreamPruneError(f"{o.cli} {value!r}: must be {'a number' if o.type is float else 'an integer' if o.type is int else 'True or False'}")
        if not 0 < self.sparsity < 1:
            hint = f" (a fraction: did you mean {self.sparsity / 100:g}?)" if 1 < self.sparsity < 100 else ""
            raise StreamPruneError(f"--sparsity {self.sparsity:g}: must be strictly between 0 and 1{hint}")
        structure = Structure.parse(self.structure)
        if self.method not in METHODS:
            raise StreamPruneError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.refine is not None and self.refine not in REFINES:
            raise StreamPruneError(f"--refine {self.refine!r}: choose {' or '.join(REFINES)}")
        if self.sparsity_profile not in PROFILES:
            raise StreamPruneError(f"--sparsity-profile {self.sparsity_profile!r}: choose {' or '.join(PROFILES)}")
        check_dtype_name(self.dtype)
        for o in declared().values():
            if o.choices and o.name != "dtype" and self._values[o.name] not in o.choices:  # dtype: aliases too
                raise StreamPruneError(f"{o.cli} {self._values[o.name]!r}: choose one of {', '.join(o.choices)}")
        for name in ("nsamples", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamPruneError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seqlen is not None and self.seqlen < 2:
            raise StreamPruneError("--seqlen must be at least 2")
        if self.snapshot_every < 0:
            raise StreamPruneError("--snapshot-every must be 0 (never) or more")
        if self.expert_group < 0:
            raise StreamPruneError("--expert-group must be 0 (as the plan says) or a positive number of experts")
        if self.expert_min_tokens < 1:  # 0 would prune an expert no token reached from all-zero statistics
            raise StreamPruneError("--expert-min-tokens must be at least 1: an expert that no calibration token "
                                   "reaches has no statistics, and takes the all-tokens fallback")
        if self.width_multiple < 1:
            raise StreamPruneError("--width-multiple must be at least 1")
        if structure.width:
            if self.method not in ("wanda", "magnitude"):
                raise StreamPruneError(f"--structure width scores channels with wanda's statistics (or magnitude, "
                                       f"without data), not --method {self.method}")
            if self.refine or self.sparsity_profile != "uniform":
                raise StreamPruneError("--structure width keeps the same channels in every block (a stock config): "
                                       "no --refine, no --sparsity-profile")
            if self.method == "magnitude" and self.width_compensation:
                raise StreamPruneError("--structure width --method magnitude has no calibration data to compensate "
                                       "with: add --no-width-compensation, or use --method wanda")
        if self.calib and self.calib_dataset:
            raise StreamPruneError("--calib and --calib-dataset: give one source of calibration text")
        if self.calib_column and not self.calib_dataset:
            raise StreamPruneError("--calib-column names a column of --calib-dataset; give --calib-dataset too")
        if self.calib_dataset:
            from .calibration import parse_dataset

            parse_dataset(self.calib_dataset)
        from .units import parse_size

        parse_size(self.gpu_memory_limit, "--gpu-memory-limit")


def check_ranks(ranks: int, nsamples: int, batch_size: int) -> None:
    """Data-parallel ranks (--nproc, or torchrun's world): each needs at least one calibration batch. One check for
    prune (before any rank starts, and in every rank) and plan."""
    if ranks < 1:
        raise StreamPruneError(f"--nproc {ranks}: must be at least 1")
    batches = -(-nsamples // batch_size)
    if ranks > batches:
        raise StreamPruneError(f"--nproc {ranks}: more ranks than calibration batches ({batches}: --nsamples {nsamples}"
                               f", --batch-size {batch_size}); use at most {batches} ranks or more --nsamples")


@dataclass(frozen=True)
class PruneSpec:
    """A prune job, resolved: the options (seqlen filled in), the model, device, dtypes and the pruner."""
    model: ModelInfo
    out: Path
    options: PruneOptions
    device: torch.device
    dtype: torch.dtype
    checkpoint_dtype: torch.dtype
    structure: Structure
    pruner: Pruner
    profile: object
    gpu_limit: int | None

    @property
    def needs_data(self) -> bool:
        return self.pruner.needs_data

    @classmethod
    def resolve(cls, model, out, options: PruneOptions, local_rank: int | None = None) -> "PruneSpec":
        from .methods import profile_named
        from .shards import Checkpoint
        from .units import parse_size

        from .hub import resolve_model

        options.check()
        model_dir, out = resolve_model(model), Path(out)
        check_paths(model_dir, out, (("--calib", options.calib), ("--calib-dataset", local_dataset(options))))
        check_out_usable(out, options.overwrite)
        device = resolve_device(options.device, local_rank)
        info = ModelInfo.load(model_dir)
        ckpt_dtype = Checkpoint(model_dir).dtype
        structure = Structure.parse(options.structure)
        pruner = options.pruner()
        if pruner.needs_data and not (options.calib or options.calib_dataset):
            seqlen = info.seqlen(options.seqlen)  # a bad --seqlen is reported before the missing --calib
            raise StreamPruneError(f"--method {options.method} needs calibration text: give --calib FILE or "
                                   f"--calib-dataset NAME (docs/options.md: \"Calibration data\")")
        if pruner.needs_data and options.calib_dataset:
            from .calibration import import_datasets

            import_datasets()  # a missing package is said before any work
        seqlen = info.seqlen(options.seqlen)
        dtype = compute_dtype(parse_dtype(options.dtype), ckpt_dtype, device)
        if structure.width:
            from .width import width_pruner

            pruner = width_pruner(info, options, dtype, ckpt_dtype)
        return cls(model=info, out=out, options=options.replace(seqlen=seqlen), device=device,
                   dtype=dtype, checkpoint_dtype=ckpt_dtype,
                   structure=structure, pruner=pruner,
                   profile=profile_named(options.sparsity_profile, options),
                   gpu_limit=parse_size(options.gpu_memory_limit, "--gpu-memory-limit"))


def local_dataset(options: PruneOptions) -> str | None:
    """The local path a --calib-dataset names, if it names one."""
    if not options.calib_dataset:
        return None
    from .calibration import parse_dataset

    name = parse_dataset(options.calib_dataset)[0]
    return name if Path(name).exists() else None


def check_paths(model_dir: Path, out: Path, inputs: tuple = ()) -> None:
    """MODEL and OUT apart; OUT a writable directory (or creatable); nothing the job reads inside OUT, which the
    job owns and --overwrite/--restart empty."""
    if not model_dir.is_dir():
        raise StreamPruneError(f"{model_dir}: no such model directory")
    check_path_length(out)
    if out.is_symlink() and not out.exists():
        raise StreamPruneError(f"OUT {out} is a dangling symbolic link; remove it or choose another directory")
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents:
        raise StreamPruneError(f"OUT {out} is the model directory or inside it; choose a directory elsewhere")
    if o in m.parents:
        raise StreamPruneError(f"OUT {out} contains the model directory; choose a directory elsewhere")
    if out.exists() and not out.is_dir():
        raise StreamPruneError(f"OUT {out} exists and is not a directory")
    for flag, path in inputs:
        if path is not None and (o == Path(path).resolve() or o in Path(path).resolve().parents):
            raise StreamPruneError(f"{flag} {path} is inside OUT {out}, which the job owns (--overwrite and --restart "
                                   f"empty it); keep the job's inputs outside OUT")
    existing = next(p for p in (o, *o.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StreamPruneError(f"OUT {out}: {existing} is not writable")


# the longest path the job writes below OUT (.streamprune/activations-after-block-00000.rank0.bin and the like),
# with room for a 5-digit rank
INSIDE_OUT = len("/.streamprune/activations-after-block-00000.rank00000.bin.tmp")


def check_path_length(out: Path) -> None:
    """OUT's names within the filesystem's NAME_MAX, and the job's files below it within PATH_MAX: refused up
    front, not when the first file is created."""
    path = Path(os.path.abspath(out))
    existing = path
    while True:  # the deepest directory that exists (a too long name cannot: lstat fails on it)
        try:
            if existing.is_dir():
                break
        except OSError:
            pass
        existing = existing.parent
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            raise StreamPruneError(f"OUT {str(out)[:40]}...: a name of {len(os.fsencode(part))} bytes, longer than the "
                                   f"filesystem allows ({name_max}); choose a shorter name")
    if len(os.fsencode(str(path))) + INSIDE_OUT >= path_max:
        raise StreamPruneError(f"OUT {str(out)[:40]}...: a path of {len(os.fsencode(str(path)))} bytes, and the job's "
                               f"files below it would pass the system's limit of {path_max} bytes; choose a shorter "
                               f"path")


def check_out_usable(out: Path, overwrite: bool) -> None:
    """An OUT that holds something other than a streamprune job is refused unless --overwrite."""
    from .state import JobDir

    if JobDir(out).foreign() and not overwrite:
        raise StreamPruneError(f"OUT {out} is not empty; choose an empty directory or add --overwrite")
