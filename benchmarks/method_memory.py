"""Peak host memory and prune time per method on blocks large enough that the block, not the interpreter, sets the
peak (target: ADMM within SparseGPT's per-block memory plus 10%).

A synthetic Llama-shaped checkpoint (benchmarks/synthetic.py; default hidden 2048, intermediate 8192, 2 blocks,
bf16) is pruned on the CPU in float32 by each method in its own process (`python -m streamprune prune ... --json`),
the methods alternating over `--rounds`. Reported per method: the prune's peak RSS (VmHWM, its own summary), the
same minus the Wanda run's (what the method's statistics and workspace add on top of the shared block, activations
and interpreter), the prune phase's seconds, and the plan's prediction (`streamprune plan --method M`).

    python benchmarks/method_memory.py                         # about 10 minutes here; run it alone
    python benchmarks/method_memory.py --hidden 512 --intermediate 2048 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from memory_scaling import CONFIG, run_json  # noqa: E402
from synthetic import make_synthetic, write_calibration  # noqa: E402

MiB = 1024 ** 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "admm"])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/streamprune-method-memory")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "method_memory.json"))
    a = ap.parse_args(argv)

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    heads = a.hidden // 128
    overrides = {"hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_attention_heads": heads,
                 "num_key_value_heads": max(1, heads // 8)}
    ckpt = make_synthetic(work / "model", CONFIG, a.layers, overrides=overrides)
    calib = write_calibration(work / "calib.jsonl", a.nsamples, a.seqlen, 1024)
    runs = {m: [] for m in a.methods}
    plans = {}
    for m in a.methods:
        plan, _ = run_json([sys.executable, "-m", "streamprune", "plan", str(work / "model"), "--json", "--method", m,
                            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--host-memory", "24GB"])
        plans[m] = plan["plan"]["peak_host_bytes"]
    for r in range(a.rounds):
        order = a.methods[r % len(a.methods):] + a.methods[:r % len(a.methods)]
        for m in order:
            out = work / f"out-{m}"
            summary, extra = run_json([sys.executable, "-m", "streamprune", "prune", str(work / "model"), str(out),
                                       "--method", m, "--calib", str(calib), "--nsamples", str(a.nsamples),
                                       "--seqlen", str(a.seqlen), "--device", "cpu", "--dtype", "float32",
                                       "--overwrite", "--json", "--no-progress"], sample=True)
            runs[m].append({"peak_rss_bytes": summary["peak_rss_bytes"], "prune_seconds": summary["phase_seconds"]["prune"],
                            "wall_seconds": summary["wall_seconds"],
                            "external_peak_rss_bytes": extra["external_peak_rss_bytes"]})
            print(f"round {r + 1} {m}: peak RSS {summary['peak_rss_bytes'] / MiB:.0f} MiB, prune "
                  f"{summary['phase_seconds']['prune']:.1f} s, wall {summary['wall_seconds']:.1f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    peak = {m: max(x["peak_rss_bytes"] for x in runs[m]) for m in a.methods}
    base = peak.get("wanda")
    lines = [f"Synthetic Llama shape: hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} blocks, bf16 "
             f"checkpoint ({ckpt['block_bytes'] / MiB:.0f} MiB per block), float32 compute on CPU, "
             f"{a.nsamples} x {a.seqlen} tokens, {a.rounds} round(s), methods alternating.", "",
             "| method | peak RSS (MiB, highest of the rounds) | above wanda (MiB) | plan (MiB) | prune s (best) |",
             "|---|---:|---:|---:|---:|"]
    for m in a.methods:
        above = "-" if base is None or m == "wanda" else f"{(peak[m] - base) / MiB:.0f}"
        lines.append(f"| {m} | {peak[m] / MiB:.0f} | {above} | {plans[m] / MiB:.0f} | "
                     f"{min(x['prune_seconds'] for x in runs[m]):.1f} |")
    if base is not None and "sparsegpt" in peak and "admm" in peak:
        ratio = (peak["admm"] - base) / max(1, peak["sparsegpt"] - base)
        lines += ["", f"ADMM's addition over Wanda / SparseGPT's: {ratio:.3f}; whole-process peak ADMM / SparseGPT: "
                  f"{peak['admm'] / peak['sparsegpt']:.3f}."]
    text = "\n".join(lines)
    print("\n" + text)
    Path(a.results).write_text(json.dumps({"args": vars(a), "runs": runs, "plans": plans, "table": text,
                                           "measured_at": time.strftime("%F %T")}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
