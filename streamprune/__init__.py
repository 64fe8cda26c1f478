"""streamprune: Wanda pruning of large language models, one decoder block in memory at a time."""

__version__ = "0.1.0"


def prune(model, out, **options):
    """Prune the checkpoint directory `model` into `out`; see `streamprune.pipeline.PruneOptions`."""
    from .pipeline import prune as _prune

    return _prune(model, out, **options)
