"""Perplexity of SmolLM2-135M pruned by every streamprune method, at 50/60/70% unstructured, 4:8 and 2:4.

Protocol (perplexity as Sun et al. 2023 measure it): calibration = 32 windows x 512 tokens drawn with seed 0
from WikiText-2 *valid*; perplexity on WikiText-2 *test*, the first 20 non-overlapping windows of 512 tokens,
batch 1, float32 on the CPU, through streamprune.evaluation.evaluate (streamed, one block at a time).

Each prune runs in its own process (`python -m streamprune prune ... --json --no-progress`) so the peak RSS
in its summary is the prune's own; the pruned checkpoint is evaluated, then deleted. Every result is written
to the JSON file as soon as it is measured, and configurations already there are skipped: an interrupted run
continues where it stopped. Tables go to quality.md, the plot to quality.png.

    python benchmarks/quality.py                       # the whole grid (resumes; ~1-2 min per configuration)
    python benchmarks/quality.py --only dense,magnitude@50%,wanda@50%,wanda@2:4   # a subset
    python benchmarks/quality.py --only 'wanda*' --only 2:4                          # patterns; rows or settings
    python benchmarks/quality.py --quick               # tiny calibration and eval, to test the script
    python benchmarks/quality.py --report              # only rebuild tables and plot from the JSON
    python benchmarks/quality.py --redo --only ria@70% # measure again, replacing the stored result

A pattern with '@' matches ROW@SETTING (fnmatch); without it, a row name or a setting name.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
WIKITEXT = SHARED / "data" / "wikitext-2"

# rows: name -> prune options (None: the dense model, not pruned)
ROWS = {
    "dense": None,
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "wanda+dsnot": dict(method="wanda", refine="dsnot"),
    "ria": dict(method="ria"),
    "ria+dsnot": dict(method="ria", refine="dsnot"),
    "sparsegpt": dict(method="sparsegpt"),
    "admm": dict(method="admm"),
    "owl": dict(method="wanda", sparsity_profile="owl"),
    "owl+dsnot": dict(method="wanda", refine="dsnot", sparsity_profile="owl"),
    "owl+ria": dict(method="ria", sparsity_profile="owl"),
    "owl+sparsegpt": dict(method="sparsegpt", sparsity_profile="owl"),
    "owl+admm": dict(method="admm", sparsity_profile="owl"),
}
# studies (not part of the grid unless named with --only): ADMM's iterations, penalty and mask schedule
STUDIES = {
    # measured first with damp 0.1 (the reference code's); damp 0.01 measured better at 70% and 2:4 and is the default
    "admm(damp=0.1)": dict(method="admm", admm_damp=0.1),
    "admm(gradual=1,damp=0.1)": dict(method="admm", admm_gradual=1, admm_damp=0.1),  # Wanda's mask, ADMM's update
    "admm(rho=0.3,damp=0.1)": dict(method="admm", admm_rho=0.3, admm_damp=0.1),
    "admm(rho=3,damp=0.1)": dict(method="admm", admm_rho=3.0, admm_damp=0.1),
    "admm(iters=40,gradual=30,damp=0.1)": dict(method="admm", admm_iters=40, admm_gradual=30, admm_damp=0.1),
    # the second allocation: OWL's per-block sparsity, then per linear inside each block
    "owl-linear": dict(method="wanda", sparsity_profile="owl-linear"),
    "owl-linear+sparsegpt": dict(method="sparsegpt", sparsity_profile="owl-linear"),
    "owl-linear+admm": dict(method="admm", sparsity_profile="owl-linear"),
}
# columns: name -> (sparsity, structure)
SETTINGS = {
    "50%": (0.5, "unstructured"),
    "60%": (0.6, "unstructured"),
    "70%": (0.7, "unstructured"),
    "4:8": (0.5, "4:8"),
    "2:4": (0.5, "2:4"),
}
# the order runs are made in when the whole grid is asked for: the settings that matter most first
PRIORITY = ["50%", "2:4", "70%", "60%", "4:8"]
# not candidates for "the best option": the reference itself and the baselines
BASELINES = ("dense", "magnitude", "wanda")
# targets: the best option must beat plain Wanda's ppl by this fraction
TARGETS = {"50%": 0.10, "2:4": 0.15, "70%": 0.30}
# reference figures for scale (an in-memory run with the same protocol)
EXPECTED = {"dense": 29.3, "magnitude@50%": 293, "wanda@50%": 53.2, "wanda@2:4": 142}


OPTS = {**ROWS, **STUDIES}


def applies(row: str, setting: str) -> bool:
    opts = OPTS[row]
    if opts is None:
        return setting == "50%"  # dense: measured once (stored under the 50% key, shown as a line)
    return not (opts.get("sparsity_profile", "uniform").startswith("owl") and ":" in setting)


def key(row: str, setting: str) -> str:
    return "dense" if OPTS[row] is None else f"{row}@{setting}"


def all_keys(studies: bool = False) -> list[tuple[str, str]]:
    """The grid (rows x settings) in PRIORITY order; with `studies`, the studies' configurations after it."""
    out = [("dense", "50%")]
    for setting in PRIORITY:
        out += [(r, setting) for r in ROWS if ROWS[r] is not None and applies(r, setting)]
    if studies:
        out += [(r, setting) for setting in PRIORITY for r in STUDIES if applies(r, setting)]
    return out


def matches(row: str, setting: str, patterns: list[str]) -> bool:
    if not patterns:
        return True
    for pat in patterns:
        if "@" in pat:
            if fnmatch.fnmatchcase(key(row, setting), pat) or fnmatch.fnmatchcase(f"{row}@{setting}", pat):
                return True
        elif fnmatch.fnmatchcase(row, pat) or fnmatch.fnmatchcase(setting, pat):
            return True
    return False


# ---------------------------------------------------------------------------------------------- storage

def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}, "errors": {}}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- measuring

def prune(model_dir: Path, out: Path, row: str, setting: str, args, log_file: Path) -> dict:
    sparsity, structure = SETTINGS[setting]
    opts = OPTS[row]
    cmd = [sys.executable, "-m", "streamprune", "prune", str(model_dir), str(out),
           "--method", opts["method"], "--sparsity", str(sparsity), "--structure", structure,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
           "--device", "cpu", "--dtype", "float32", "--overwrite", "--json", "--no-progress", "--debug"]
    if opts.get("refine"):
        cmd += ["--refine", opts["refine"]]
    if opts.get("sparsity_profile", "uniform") != "uniform":
        cmd += ["--sparsity-profile", opts["sparsity_profile"]]
    if opts["method"] != "magnitude":
        cmd += ["--calib", str(args.calib)]
    for name, value in opts.items():  # a method's own options (admm_rho -> --admm-rho 0.3)
        if name not in ("method", "refine", "sparsity_profile"):
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    t = time.perf_counter()
    with open(log_file, "w") as err:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    process_seconds = time.perf_counter() - t
    if res.returncode:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"prune exited {res.returncode}: {' '.join(cmd[1:])}\n{tail}")
    summary = json.loads(res.stdout)
    summary["process_seconds"] = process_seconds
    summary["command"] = " ".join(["python"] + cmd[1:])
    return summary


def evaluate(model_dir: Path, ids, args) -> dict:
    from streamprune.evaluation import evaluate as run

    return run(model_dir, ids=ids, seqlen=args.seqlen_eval, windows=args.windows, device="cpu",
               dtype="float32", progress=False)


def test_ids(model_dir: Path, args):
    from streamprune.evaluation import read_token_stream

    stream = read_token_stream(args.text, model_dir)
    # evaluate() uses the first `windows` windows of the stream; cutting it here gives the same windows
    return stream, stream[: args.windows * args.seqlen_eval]


def measure(row: str, setting: str, model_dir: Path, ids, args, work: Path) -> dict:
    rec = {"row": row, "setting": setting, "load_avg_start": round(os.getloadavg()[0], 2)}
    target = model_dir
    if OPTS[row] is not None:
        sparsity, structure = SETTINGS[setting]
        rec.update(target_sparsity=sparsity, structure=structure, options=OPTS[row])
        target = work / key(row, setting).replace("@", "_").replace(":", "-").replace("%", "pct")
        log_file = work / (target.name + ".log")
        try:
            s = prune(model_dir, target, row, setting, args, log_file)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        rec.update(sparsity=s["sparsity"], prune_seconds=s["wall_seconds"], prune_process_seconds=s["process_seconds"],
                   peak_rss_bytes=s["peak_rss_bytes"], peak_anon_bytes=s.get("peak_anon_bytes"),
                   phase_seconds=s.get("phase_seconds"), block_sparsity=s.get("block_sparsity"),
                   worst_block=s.get("worst_block"), activations=s.get("activations"), command=s["command"])
    try:
        e = evaluate(target, ids, args)
    finally:
        if target != model_dir:
            shutil.rmtree(target, ignore_errors=True)
    rec.update(load_avg_end=round(os.getloadavg()[0], 2), ppl=e["ppl"], nll=e["nll"], eval_seconds=e["wall_seconds"], eval_windows=e["windows"],
               eval_seqlen=e["seqlen"])
    return rec


# ---------------------------------------------------------------------------------------------- reporting

def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.3g}" if x < 1e5 else f"{x:.2e}"


def best_other(runs: dict, setting: str) -> tuple[str, float] | None:
    cands = [(r, runs[key(r, setting)]["ppl"]) for r in ROWS
             if r not in BASELINES and applies(r, setting) and key(r, setting) in runs]
    return min(cands, key=lambda c: c[1]) if cands else None


def targets_lines(runs: dict) -> list[str]:
    lines = ["| setting | target | best option | its ppl | wanda ppl | improvement | verdict |",
             "|---|---|---|---|---|---|---|"]
    for setting, need in TARGETS.items():
        w = runs.get(key("wanda", setting))
        b = best_other(runs, setting)
        if w is None or b is None:
            what = "wanda not measured" if w is None else "no option other than wanda measured"
            lines.append(f"| {setting} | >= {need:.0%} | ({what}) | | {fmt_ppl(w['ppl']) if w else ''} | | |")
            continue
        tried = [r for r in ROWS if r not in BASELINES and applies(r, setting) and key(r, setting) in runs]
        gain = 1 - b[1] / w["ppl"]
        verdict = (f"met (+{100 * (gain - need):.1f} pts)" if gain >= need
                   else f"missed by {100 * (need - gain):.1f} pts")
        lines.append(f"| {setting} | >= {need:.0%} | {b[0]} (of {len(tried)} measured) | {fmt_ppl(b[1])} | "
                     f"{fmt_ppl(w['ppl'])} | {100 * gain:.1f}% | {verdict} |")
    return lines


def markdown(data: dict) -> str:
    runs, meta = data["runs"], data.get("meta", {})
    cols = list(SETTINGS)
    lines = [f"# Pruning quality on SmolLM2-135M{' (QUICK MODE: not meaningful)' if meta.get('quick') else ''}", "",
             f"WikiText-2 test perplexity, first {meta.get('windows')} windows x {meta.get('seqlen_eval')} tokens "
             f"(wanda-spec.md protocol); calibration {meta.get('nsamples')} x {meta.get('seqlen')} tokens from "
             f"WikiText-2 valid, seed 0; float32 on CPU. Made by `python benchmarks/quality.py`.", ""]
    dense = runs.get("dense")
    lines.append(f"Dense: **{fmt_ppl(dense['ppl']) if dense else '-'}**. "
                 "Bold: best pruned result per column. -: not measured yet. n/a: OWL varies unstructured sparsity per "
                 "block, not N:M.")
    lines += ["", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    best = {}
    for c in cols:
        vals = [runs[key(r, c)]["ppl"] for r in ROWS if r != "dense" and applies(r, c) and key(r, c) in runs]
        best[c] = min(vals) if vals else None
    for r in ROWS:
        if r == "dense":
            continue
        if not any(key(r, c) in runs or key(r, c) in data.get("errors", {}) for c in cols if applies(r, c)):
            continue
        cells = []
        for c in cols:
            if not applies(r, c):
                cells.append("n/a")
            elif key(r, c) in runs:
                p = runs[key(r, c)]["ppl"]
                cells.append(f"**{fmt_ppl(p)}**" if p == best[c] else fmt_ppl(p))
            elif key(r, c) in data.get("errors", {}):
                cells.append("error")
            else:
                cells.append("-")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")

    lines += ["", "## Targets (best option vs plain Wanda)", "",
              "improvement = 1 - best ppl / wanda ppl, the best taken over the measured options other than "
              "magnitude and wanda.", ""] + targets_lines(runs)

    lines += ["", "## Time and memory per run", "",
              "prune s: the job's wall time (summary `wall_seconds`); process s: the whole `python -m streamprune "
              "prune` process (interpreter, imports, tokenizing the calibration text); peak RSS: the prune process's "
              "own (VmHWM); eval s: streamed perplexity. The machine is shared: times vary several-fold with the "
              "other jobs' load (1-minute load average at the start and end of each run in the JSON, when recorded), "
              "so compare times only between runs made under similar load; memory and perplexity do not vary.", "",
              "| method | setting | achieved sparsity | prune s | process s | peak RSS (MiB) | eval s | ppl |",
              "|---|---|---|---|---|---|---|---|"]
    for r, c in [("dense", "50%")] + [(r, c) for r in ROWS if r != "dense" for c in cols if applies(r, c)]:
        rec = runs.get(key(r, c))
        if rec is None:
            continue
        if r == "dense":
            lines.append(f"| dense | - | 0 | - | - | - | {rec['eval_seconds']:.1f} | {fmt_ppl(rec['ppl'])} |")
            continue
        lines.append(f"| {r} | {c} | {rec['sparsity']:.4f} | {rec['prune_seconds']:.1f} | "
                     f"{rec['prune_process_seconds']:.1f} | {rec['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{rec['eval_seconds']:.1f} | {fmt_ppl(rec['ppl'])} |")
    studied = [(r, c) for r in STUDIES for c in cols if applies(r, c) and key(r, c) in runs]
    if studied:
        lines += ["", "## Studies", "",
                  "Variants measured with the same protocol (`--only 'NAME@SETTING'`), beside the grid's row they vary.",
                  "", "| variant | setting | options | achieved sparsity | prune s | peak RSS (MiB) | ppl | grid row's ppl |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, c in studied:
            rec = runs[key(r, c)]
            row = "owl" + r[len("owl-linear"):] if r.startswith("owl-linear") else r.split("(")[0]
            grid = runs.get(key(row, c)) if row in ROWS else None
            opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in OPTS[r].items())
            lines.append(f"| {r} | {c} | `{opts}` | {rec['sparsity']:.4f} | {rec['prune_seconds']:.1f} | "
                         f"{rec['peak_rss_bytes'] / 2**20:.0f} | {fmt_ppl(rec['ppl'])} | "
                         f"{fmt_ppl(grid['ppl']) if grid else '-'} |")
    errors = data.get("errors", {})
    if errors:
        lines += ["", "## Failed runs", ""]
        for k, e in errors.items():
            lines.append(f"- `{k}`: {e['error'].splitlines()[0]}")
    env = meta.get("env")
    if env:
        lines += ["", f"Environment: {env}."]
    return "\n".join(lines) + "\n"


STYLE = {
    "magnitude": ("tab:gray", "x", ":"),
    "wanda": ("black", "o", "-"),
    "wanda+dsnot": ("tab:blue", "s", "--"),
    "ria": ("tab:orange", "^", "-"),
    "ria+dsnot": ("tab:red", "v", "--"),
    "sparsegpt": ("tab:green", "D", "-"),
    "owl": ("tab:purple", "P", "-"),
    "owl+dsnot": ("tab:pink", "X", "--"),
    "owl+ria": ("tab:brown", "*", "-."),
    "owl+sparsegpt": ("tab:olive", "h", "-."),
    "admm": ("tab:cyan", "d", "-"),
    "owl+admm": ("navy", "p", "-."),
}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13.5, 5.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    dense = runs.get("dense", {}).get("ppl")
    unstructured = ["50%", "60%", "70%"]
    nm = ["4:8", "2:4"]
    rows = [r for r in ROWS if r != "dense" and any(key(r, c) in runs for c in SETTINGS if applies(r, c))]
    # a small horizontal offset per method so that close points (all near wanda at 50%) stay visible
    spread = 2.4 / max(1, len(rows))
    for j, r in enumerate(rows):
        color, marker, ls = STYLE.get(r, ("k", "o", "-"))
        dx = -1.2 + spread * (j + 0.5)
        xs = [int(c[:-1]) + dx for c in unstructured if key(r, c) in runs]
        ys = [runs[key(r, c)]["ppl"] for c in unstructured if key(r, c) in runs]
        if xs:
            ax1.plot(xs, ys, marker=marker, ls=ls, color=color, label=r, lw=1.8, ms=7)
    ax1.set_xticks([50, 60, 70])
    ax1.set_xticklabels(["50%", "60%", "70%"])
    ax1.set_xlim(47, 73)
    ax1.set_xlabel("unstructured sparsity (every linear of every block)")
    ax1.set_title("unstructured")

    nm_rows = [r for r in rows if any(key(r, c) in runs for c in nm)]
    width = 0.8 / max(1, len(nm_rows))
    for j, r in enumerate(nm_rows):
        color, marker, _ = STYLE.get(r, ("k", "o", "-"))
        xs = [i - 0.4 + width * (j + 0.5) for i, c in enumerate(nm) if key(r, c) in runs]
        ys = [runs[key(r, c)]["ppl"] for c in nm if key(r, c) in runs]
        ax2.plot(xs, ys, marker=marker, ls="none", color=color, ms=9, label=r)
    ax2.set_xticks(range(len(nm)))
    ax2.set_xticklabels([f"{c} (50%)" for c in nm])
    ax2.set_xlim(-0.6, len(nm) - 0.4)
    for i in range(len(nm) - 1):
        ax2.axvline(i + 0.5, color="0.85", lw=1)
    ax2.set_xlabel("N:M semi-structured (N zeroed in every M)")
    ax2.set_title("N:M (OWL does not apply)")

    for ax in (ax1, ax2):
        ax.set_yscale("log")
        if dense:
            ax.axhline(dense, color="k", ls=(0, (2, 2)), lw=1.2)
        ax.grid(True, which="major", axis="y", alpha=0.4)
        ax.grid(True, which="minor", axis="y", alpha=0.15)
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in (ax1, ax2):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax1.set_ylabel("WikiText-2 test perplexity (log scale)")
    # one legend for both panels, outside the axes so it hides no point
    handles = [Line2D([], [], color=STYLE.get(r, ("k", "o", "-"))[0], marker=STYLE.get(r, ("k", "o", "-"))[1],
                      ls=STYLE.get(r, ("k", "o", "-"))[2], lw=1.8, ms=7, label=r) for r in rows]
    if dense:
        handles.append(Line2D([], [], color="k", ls=(0, (2, 2)), lw=1.2, label=f"dense ({dense:.1f})"))
    fig.legend(handles=handles, loc="center right", fontsize=9.5, frameon=False, bbox_to_anchor=(1.0, 0.5))
    meta = data.get("meta", {})
    fig.suptitle(f"SmolLM2-135M pruned with streamprune: calibration {meta.get('nsamples')}x{meta.get('seqlen')} "
                 f"WikiText-2 valid, eval {meta.get('windows')}x{meta.get('seqlen_eval')} WikiText-2 test"
                 + (" [QUICK MODE]" if meta.get("quick") else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, json_path: Path) -> str:
    md = markdown(data)
    stem = json_path.stem
    (json_path.parent / f"{stem}.md").write_text(md)
    if data["runs"]:
        plot(data, json_path.parent / f"{stem}.png")
    return md


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", action="append", default=[], help="comma-separated patterns: ROW@SETTING, ROW or SETTING")
    p.add_argument("--quick", action="store_true", help="4 x 128 calibration, 2 x 128 eval, results in quality-quick.*")
    p.add_argument("--report", action="store_true", help="rebuild tables and plot from the JSON only")
    p.add_argument("--redo", action="store_true", help="measure matching configurations again even when stored")
    p.add_argument("--json", type=Path, default=None, help="results file [default: benchmarks/results/quality.json]")
    p.add_argument("--model", type=Path, default=None, help="checkpoint [default: the demo's SmolLM2-135M]")
    p.add_argument("--work", type=Path, default=None, help="scratch directory for pruned checkpoints")
    args = p.parse_args(argv)
    patterns = [x for chunk in args.only for x in chunk.split(",") if x]

    if args.quick:
        args.nsamples, args.seqlen, args.windows, args.seqlen_eval = 4, 128, 2, 128
        json_path = args.json or RESULTS / "quality-quick.json"
    else:
        args.nsamples, args.seqlen, args.windows, args.seqlen_eval = 32, 512, 20, 512
        json_path = args.json or RESULTS / "quality.json"
    args.calib = WIKITEXT / "valid.txt"
    args.text = WIKITEXT / "test.txt"
    meta = {"model": "SmolLM2-135M (streamprune demo checkpoint, bf16)", "nsamples": args.nsamples,
            "seqlen": args.seqlen, "windows": args.windows, "seqlen_eval": args.seqlen_eval, "seed": 0,
            "calib": "wikitext-2/valid.txt", "text": "wikitext-2/test.txt", "quick": args.quick}

    data = load(json_path)
    data.setdefault("runs", {})
    data.setdefault("errors", {})
    old = data.get("meta")
    if old and any(old.get(k) != meta[k] for k in ("nsamples", "seqlen", "windows", "seqlen_eval")):
        print(f"{json_path} was made with other settings ({old}); use --json to write elsewhere", file=sys.stderr)
        return 2

    if not args.report:
        import torch

        import streamprune
        from streamprune.demo import build_smollm2

        meta["env"] = (f"streamprune {streamprune.__version__}, torch {torch.__version__}, "
                       f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                       f"{torch.get_num_threads()} torch threads")
        data["meta"] = meta
        named = [p.split("@")[0] for p in patterns if p not in SETTINGS]  # studies only when a pattern names them
        keys = all_keys(studies=any(fnmatch.fnmatchcase(st, p) for p in named for st in STUDIES))
        todo = [(r, c) for r, c in keys if matches(r, c, patterns) and (args.redo or key(r, c) not in data["runs"])]
        skipped = [key(r, c) for r, c in keys if matches(r, c, patterns) and key(r, c) in data["runs"] and not args.redo]
        print(f"{len(todo)} configuration(s) to measure; {len(skipped)} already in {json_path}", flush=True)
        if todo:
            model_dir = args.model or build_smollm2()
            _, ids = test_ids(model_dir, args)
            work = args.work or Path(tempfile.mkdtemp(prefix="streamprune-quality-"))
            work.mkdir(parents=True, exist_ok=True)
            t_all = time.perf_counter()
            for n, (r, c) in enumerate(todo, 1):
                k = key(r, c)
                t = time.perf_counter()
                print(f"[{n}/{len(todo)}] {k} ...", end=" ", flush=True)
                try:
                    rec = measure(r, c, model_dir, ids, args, work)
                except Exception as e:  # noqa: BLE001 - record it and go on with the next configuration
                    data["errors"][k] = {"error": f"{type(e).__name__}: {e}", "when": time.strftime("%F %T")}
                    save(json_path, data)
                    print(f"FAILED ({time.perf_counter() - t:.0f}s): {str(e).splitlines()[0]}", flush=True)
                    continue
                rec["measured_at"] = time.strftime("%F %T")
                data["runs"][k] = rec
                data["errors"].pop(k, None)
                save(json_path, data)
                extra = "" if r == "dense" else (f", sparsity {rec['sparsity']:.4f}, prune {rec['prune_seconds']:.0f}s, "
                                                 f"RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB")
                ref = EXPECTED.get(k)
                print(f"ppl {rec['ppl']:.2f}{f' (expected ~{ref})' if ref and not args.quick else ''}{extra}, "
                      f"eval {rec['eval_seconds']:.0f}s, total {time.perf_counter() - t:.0f}s", flush=True)
            print(f"measured {len(todo)} configuration(s) in {time.perf_counter() - t_all:.0f}s", flush=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    md = write_report(data, json_path)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
