"""Pruning methods behind one small protocol (base.py), and the registry the options name them from.

Adding a method: a `Method` subclass in a file of its own (its name, the statistics it `needs`, its own
`options`), and one line in METHODS, or `register(MyMethod)` from outside the package. Nothing here imports
torch: the CLI reads the names and the options before it is loaded.
"""

from __future__ import annotations

from ..errors import StreamPruneError
from .admm import ADMM
from .base import Method, Profile, Pruned, Pruner, Refinement, Structure, Uniform, check_prunable, select
from .dsnot import DSnoT
from .magnitude import Magnitude
from .owl import OWL, OWLLinear
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {m.name: m for m in (Wanda, Magnitude, RIA, SparseGPT, ADMM)}
REFINES = {r.name: r for r in (DSnoT,)}
PROFILES = {p.name: p for p in (Uniform, OWL, OWLLinear)}


def register(cls) -> type:
    """Add a Method, Refinement or Profile subclass to its registry (by its `name`): prune, plan and the CLI offer
    it, with its own options, from then on (a CLI built before keeps the options it was built with)."""
    registry = METHODS if issubclass(cls, Method) else REFINES if issubclass(cls, Refinement) else PROFILES
    if not cls.name or (cls.name in registry and registry[cls.name] is not cls):
        raise StreamPruneError(f"cannot register {cls.__name__}: its name {cls.name!r} is empty or taken")
    registry[cls.name] = cls
    return cls


def declared_options() -> tuple:
    """The options every registered method, refinement and profile declares (each once, in registry order)."""
    seen = {}
    for cls in (*METHODS.values(), *REFINES.values(), *PROFILES.values()):
        for o in cls.options:
            seen.setdefault(o.name, o)
    return tuple(seen.values())


def choices_of(option) -> tuple:
    """The values an option takes: the registry's names for --method, --refine and --sparsity-profile."""
    return {"method": tuple(METHODS), "refine": tuple(REFINES), "sparsity_profile": tuple(PROFILES)}.get(
        option.name, option.choices)


def described(option) -> str:
    """The registered methods' one-line summaries, for --method's help and the options table."""
    if option.name != "method":
        return ""
    return "; ".join(f"{n}: {cls.summary}" if cls.summary else n for n, cls in METHODS.items()) + "."


def _params(cls, options) -> dict:
    """`cls`'s own options from `options` (a PruneOptions), as its constructor's keywords."""
    if options is None:
        return {}
    return {o.param or o.name.split("_", 1)[1]: getattr(options, o.name) for o in cls.options}


def method_named(name: str, options=None) -> Method:
    """The method called `name`, built with its own declared options from `options` (a PruneOptions)."""
    if name not in METHODS:
        raise StreamPruneError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name](**_params(METHODS[name], options))


def refinement_named(name: str, options=None) -> Refinement:
    return REFINES[name](**_params(REFINES[name], options))


def profile_named(name: str, options=None) -> Profile:
    """The sparsity profile called `name`, built with its own declared options from `options` (a PruneOptions)."""
    return PROFILES[name](**_params(PROFILES[name], options))


__all__ = ["ADMM", "METHODS", "REFINES", "PROFILES", "Method", "Refinement", "Profile", "Pruner", "Pruned", "Structure",
           "check_prunable", "select", "method_named", "profile_named", "refinement_named", "register",
           "declared_options", "choices_of", "described"]
