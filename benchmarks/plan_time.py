"""The plan's time estimate against measured prune jobs on SmolLM2-135M (the demo's build), CPU.

For each case, `streamprune plan MODEL --json` (rates measured then) and right after it the same job,
`streamprune prune MODEL OUT --json` in its own process; the cases run one after another, never beside another
job. Reported: predicted and measured seconds, in all and per phase (forward: the dense statistics pass and the
propagation; prune: the prune phase), and their ratio. Needs the demo model (`streamprune demo` builds it) and
calibration text (default: the demo's, the interpreter's help topics).

    python benchmarks/plan_time.py                 # about 10 minutes here; run it alone
    python benchmarks/plan_time.py --cases wanda   # one case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune"))
CASES = {  # name: prune options
    "wanda": ["--nsamples", "16", "--seqlen", "128"],
    "wanda-128x512": ["--nsamples", "128", "--seqlen", "512"],
    "sparsegpt": ["--method", "sparsegpt", "--nsamples", "16", "--seqlen", "128"],
    "admm": ["--method", "admm", "--nsamples", "16", "--seqlen", "128"],
    "dsnot": ["--refine", "dsnot", "--nsamples", "16", "--seqlen", "128"],
    "owl": ["--sparsity-profile", "owl", "--sparsity", "0.7", "--nsamples", "16", "--seqlen", "128"],
    "width": ["--structure", "width", "--sparsity", "0.2", "--nsamples", "16", "--seqlen", "128"],
    "magnitude": ["--method", "magnitude"],
}


def run(cmd: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-m", "streamprune", *cmd, "--json"], stdout=subprocess.PIPE, text=True,
                         check=True)
    return json.loads(res.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=CACHE / "smollm2-135m")
    ap.add_argument("--calib", type=Path, default=CACHE / "calib-python-help-topics.txt")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            opts = CASES[name]
            plan = run(["plan", str(args.model), *opts])["time"]
            t0 = time.perf_counter()
            calib = [] if "magnitude" in opts else ["--calib", str(args.calib)]
            summary = run(["prune", str(args.model), str(Path(tmp) / name), *calib, *opts, "--restart",
                           "--no-progress"])
            wall = time.perf_counter() - t0
            ph = summary["phase_seconds"]
            io = ("prune", "read", "read_block", "write", "snapshot", "capture")
            measured = {"forward": sum(v for k, v in ph.items() if k not in io),
                        "prune": ph.get("prune", 0), "job": summary["wall_seconds"], "process": wall}
            row = {"case": name, "options": " ".join(opts), "predicted": plan["seconds"],
                   "predicted_forward": plan["forward_seconds"] + plan["statistics_seconds"],
                   "predicted_prune": plan["prune_seconds"], **{f"measured_{k}": v for k, v in measured.items()},
                   "ratio": plan["seconds"] / summary["wall_seconds"], "rates": plan["rates"]}
            rows.append(row)
            print(f"{name:<14} predicted {row['predicted']:7.1f} s (forward {row['predicted_forward']:6.1f}, prune "
                  f"{row['predicted_prune']:6.1f})  measured job {measured['job']:7.1f} s (forward "
                  f"{measured['forward']:6.1f}, prune {measured['prune']:6.1f})  ratio {row['ratio']:.2f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
