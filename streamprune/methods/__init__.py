"""Pruning methods behind one small protocol (base.py), and the registry the options name them from.

Adding a method: a `Method` subclass in a file of its own, and one line in METHODS.
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


def method_named(name: str, options=None) -> Method:
    """The method called `name`, with its own options from `options` (a PruneOptions): the fields named
    `<name>_<parameter>` (admm_iters -> ADMM(iters=...))."""
    if name not in METHODS:
        raise StreamPruneError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    prefix = name + "_"
    params = {k[len(prefix):]: v for k, v in vars(options).items() if k.startswith(prefix)} if options else {}
    return METHODS[name](**params)


def profile_named(name: str, owl_lambda: float = 0.08, owl_m: float = 5.0) -> Profile:
    return PROFILES[name](owl_lambda, owl_m) if issubclass(PROFILES[name], OWL) else PROFILES[name]()


__all__ = ["ADMM", "METHODS", "REFINES", "PROFILES", "Method", "Refinement", "Profile", "Pruner", "Pruned", "Structure",
           "check_prunable", "select", "method_named", "profile_named"]
