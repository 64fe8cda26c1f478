"""streamprune: prune large language models (Wanda, RIA, SparseGPT, ADMM, magnitude; DSnoT, OWL; unstructured,
N:M or MLP width) while holding one decoder block in memory at a time.

The Python API is these four functions; the CLI (`streamprune prune|plan|eval|report`) is a thin layer over them.
Torch and transformers are imported only when one is called.
"""

from .version import __version__  # noqa: F401 - streamprune.__version__

__all__ = ["prune", "plan", "evaluate", "report"]


def prune(model, out, **options) -> dict:
    """Prune the checkpoint `model` (a directory with config.json and safetensors shards, or a Hub id) into `out`,
    one decoder block at a time; resumes a job already in `out` with the same options.

    Options: keywords named as the CLI's without dashes (`calib`, `sparsity`, `structure`, `method`, `refine`,
    `sparsity_profile`, `nsamples`, `seqlen`, `dtype`, `width_multiple`, `admm_iters`, ...), each declared once with
    its type, default and help in `streamprune.options` and the methods' own files; the table is docs/options.md
    (`python -m streamprune.options`). Also `observer=` (a `streamprune.runtime.Observer`) or `log=` (a callable
    taking one line).

    Returns the summary (`streamprune prune --json`): blocks, achieved sparsity, phase times, peak memory.
    Raises `streamprune.errors.StreamPruneError` (one line) for every input it refuses.
    """
    from .job import prune as _prune

    return _prune(model, out, **options)


def plan(model, *, gpu_memory=None, host_memory=None, device=None, ranks: int = 1, **options) -> dict:
    """Predict a prune job's memory (GPU, host, disk), activation tier and time from config.json (and the shards'
    headers when present) without reading weights; `options` are `prune`'s. `gpu_memory` (e.g. "24GB") plans for
    a card of that size (device defaults to cuda then), `host_memory` defaults to what is available now.
    Returns `streamprune plan --json`'s dict ("plan", "cards" for 8-24 GB, "time")."""
    from .planner import plan_for

    return plan_for(model, gpu_memory=gpu_memory, host_memory=host_memory, device=device, ranks=ranks, **options)


def evaluate(model, text=None, **options) -> dict:
    """Perplexity of the checkpoint `model` on the text file `text` in non-overlapping windows, streamed one block
    at a time (WikiText-style: mean cross-entropy of the shifted logits per window, ppl = exp(mean)). Options:
    `seqlen`, `windows`, `device`, `dtype`, `batch_size`, `progress`, `expert_group`, or `ids` (a 1-D token
    tensor instead of `text`). Returns {"ppl", "nll", "windows", "seqlen", "wall_seconds", ...}."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(model, text, **options)


def report(out, png=None) -> dict:
    """What a checkpoint holds: the kind of pruning, the sparsity of every pruned weight per block, linear and
    expert, whether each is 2:4, and for width outputs the MLP width and size per block; read one tensor at a
    time. With `png`, also draws the chart there (needs matplotlib)."""
    from .reporting import report as _report

    return _report(out, png=png)
