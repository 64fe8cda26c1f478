"""Every option of a prune job, declared once: name, type, default, help, its group in `--help` and the docs, the
commands that take it, and whether it changes the output (then it is part of the job's fingerprint).

Derived from these declarations: `spec.PruneOptions` (its fields and defaults), the fingerprint's keys
(`output_keys`), the click options of `prune`, `plan` and `eval` (cli.py) and the options table of
docs/options.md (`markdown_table`); tests/test_options.py fails when one drifts from the others. A method or a
sparsity profile declares its own options in its own file (`Method.options`, `Profile.options`); they join the
job's when it is registered (methods/__init__.py). No torch here: the CLI builds its options, and refuses a bad
value, before torch is imported.
"""

from __future__ import annotations

from .choices import EVAL, PLAN, PRUNE, Option  # noqa: F401 - the declaration type lives with the names

# the order of `prune --help` and of docs/options.md: the options every job sets first, then per mode, then the job's own
GROUPS = ("Calibration", "Pruning", "Width", "Mixture-of-Experts", "Device and memory", "Job")

JOB = (
    Option("calib", None, "Calibration text: plain text, or JSONL with \"text\" or \"input_ids\" lines (ids are used as they are: "
           "exact windows).", path=True, data=True,
           group="Calibration", commands=(PRUNE,)),
    Option("calib_dataset", None, "Calibration text from a dataset (pip install 'streamprune[datasets]'): NAME, "
           "NAME:SPLIT or NAME:CONFIG:SPLIT; a save_to_disk directory, data files, or a name in the local datasets "
           "cache.", group="Calibration", data=True),
    Option("calib_column", None, "--calib-dataset: the text column.", default_text="\"text\", or the only text column",
           group="Calibration", data=True),
    Option("nsamples", 128, "Calibration sequences.", int, output=True, group="Calibration", commands=(PRUNE, PLAN)),
    Option("seqlen", None, "Tokens per calibration sequence.", int, output=True, default_text="min(2048, model context)",
           group="Calibration", commands=(PRUNE, PLAN)),
    Option("seed", 0, "Seed for drawing calibration windows.", int, output=True, group="Calibration"),
    Option("sparsity", 0.5, "Fraction of weights to zero (unstructured); with --structure width, of MLP channels to "
           "remove.", float, output=True, group="Pruning", commands=(PRUNE, PLAN)),
    Option("structure", "unstructured", "'unstructured', N:M (N zeroed in every M consecutive inputs: 2:4, 4:8, ...), or "
           "'width': remove the fraction --sparsity of every block's MLP channels (a smaller model; docs/edge.md).", output=True, group="Pruning", commands=(PRUNE, PLAN)),
    Option("method", "wanda", "How each weight matrix is pruned (docs/methods.md).", output=True, group="Pruning",
           commands=(PRUNE, PLAN)),  # choices: the registered methods (methods/__init__.py)
    Option("refine", None, "Refine the wanda/ria mask: dsnot, training-free swaps that drive each row's expected "
           "output error toward 0, sparsity unchanged.", output=True, group="Pruning", commands=(PRUNE, PLAN)),
    Option("sparsity_profile", "uniform", "How sparse each block is: uniform; owl: per-block sparsity from a dense "
           "outlier sweep (average = --sparsity); owl-linear: owl, and inside each block per linear from its own "
           "outlier share.", output=True, group="Pruning", commands=(PRUNE, PLAN)),
    Option("width_multiple", 256, "--structure width: channels kept per block, rounded to a multiple of this (256: "
           "every row quantizes in llama.cpp's k-quants; 32: its legacy quants; 64/128: GPU tensor cores).", int,
           output=True, group="Width", commands=(PRUNE, PLAN)),
    Option("width_compensation", True, "--structure width: refit the down projection on the kept channels by least "
           "squares.", bool, output=True, group="Width", commands=(PRUNE, PLAN)),
    Option("expert_min_tokens", 16, "Mixture-of-Experts: an expert reached by fewer calibration tokens is pruned with "
           "the statistics of all tokens routed to it by force.", int, output=True, group="Mixture-of-Experts",
           commands=(PRUNE, PLAN)),
    Option("expert_group", 0, "Mixture-of-Experts: stream each block's experts through the device this many at a "
           "time (0: only when the plan says a whole block does not fit, in the largest groups that do).", int,
           group="Mixture-of-Experts", commands=(PRUNE, PLAN)),  # eval's own: 0 there is whole blocks
    Option("device", "auto", "auto, cpu, cuda or cuda:N.", group="Device and memory", commands=(PRUNE, EVAL)),
    Option("dtype", None, "Compute dtype (bfloat16 matmuls are several times slower than float32 on CPUs "
           "without bfloat16 units).", output=True, choices=("float32", "bfloat16", "float16"),
           default_text="checkpoint dtype on GPU, float32 on CPU", group="Device and memory",
           commands=(PRUNE, PLAN, EVAL)),
    Option("batch_size", 1, "Sequences per forward (1 is the reference's, and exact).", int, output=True, group="Device and memory",
           commands=(PRUNE, PLAN, EVAL)),
    Option("activations", "auto", "Activation cache tier: gpu, cpu (pinned with CUDA) or disk; auto picks the fastest "
           "that fits.", choices=("auto", "gpu", "cpu", "disk"),
           group="Device and memory", commands=(PRUNE, PLAN)),
    Option("gpu_memory_limit", None, "Cap this process's GPU memory (e.g. 24GB; a bare number is GB) to prove a "
           "smaller card.", group="Device and memory"),
    Option("attn_implementation", "sdpa", "The attention kernel transformers runs (Python API only).", output=True,
           group="Device and memory", commands=()),
    Option("snapshot_every", 8, "Save the activations every K blocks so a resume needs little recomputation (0: "
           "never).", int, group="Job", commands=(PRUNE, PLAN)),
    Option("overwrite", False, "Delete the contents of a non-empty OUT first.", bool),
    Option("restart", False, "Discard an existing job in OUT instead of resuming it.", bool),
    Option("overlap", True, "Read and write blocks in the foreground (default: on a second thread, beside the compute).", bool,
           flag="--no-overlap"),
    Option("progress", True, "No progress bars (default: bars on a terminal, else one plain line per block).", bool,
           flag="--no-progress",
           commands=(PRUNE, EVAL)),
)


def declared() -> dict:
    """name -> Option for the job's options and those of every registered method and profile."""
    from .methods import declared_options

    return {o.name: o for o in JOB + declared_options()}


def output_keys() -> tuple:
    """The options that change the output bytes: the fingerprint's keys, in declaration order."""
    return tuple(name for name, o in declared().items() if o.output)


def for_command(command: str) -> list:
    """The declarations `command` takes, in --help order (GROUPS, then declaration order)."""
    opts = [o for o in declared().values() if command in o.commands]
    after_pruning = GROUPS.index("Pruning") + 0.5  # a method's or profile's own options follow the choice of it
    return sorted(opts, key=lambda o: GROUPS.index(o.group) if o.group in GROUPS else after_pruning)


def markdown_table(command: str = PRUNE) -> str:
    """docs/options.md's table of `command`'s options (tests/test_options.py holds the file to it)."""
    from .methods import choices_of, described

    rows = ["| option | default | changes the output | what it does |", "|---|---|---|---|"]
    for o in for_command(command):
        values = choices_of(o)
        what = " ".join(filter(None, (o.help, described(o)))) + (f" One of: {', '.join(values)}." if values and
                                                                not described(o) else "")
        what = what.replace("|", "\\|")  # a cell of a markdown table
        changes = "yes" if o.output else "yes (the text's hash)" if o.data else "no"
        rows.append(f"| `{o.flag or o.cli}` | {o.shown_default()} | {changes} | {what} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # docs/options.md's table: python -m streamprune.options
    print(markdown_table(), end="")
