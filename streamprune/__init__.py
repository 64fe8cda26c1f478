"""streamprune: Wanda pruning of large language models, one decoder block in memory at a time."""

__version__ = "0.1.0"


def prune(model, out, **options):
    """Prune the checkpoint directory `model` into `out`; options: see `streamprune.spec.PruneOptions`, plus
    `observer=` (a `streamprune.runtime.Observer`) or `log=` (a callable taking one line)."""
    from .job import prune as _prune

    return _prune(model, out, **options)
