"""How freed block memory goes back to the OS: the current way against the previous one, in one invocation.

* current: block-lifetime tensors in mappings of their own (memory.host_empty), malloc_trim after each block
  and after large linears, glibc's allocator otherwise left alone;
* previous: a process-wide M_MMAP_THRESHOLD of 64 KiB (set here with mallopt before the CLI starts, as
  streamprune did before memory.host_empty), which made every tensor above 64 KiB, every activation of every op
  included, a fresh mapping.

Two measurements per setting, alternating (current, previous, previous, current, ...):
- peak RSS of a 2-block and an 8-block prune of a Llama-shaped model (hidden 768, intermediate 3072, float32,
  4 x 64 tokens): flat in depth means the 8-block peak within 5% of the 2-block one;
- whole-process wall time of the SmolLM2-135M job of benchmarks/throughput.py (16 x 256 tokens, float32, CPU).

    python benchmarks/allocator.py            # about 6 minutes here; run it alone on the machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
PREVIOUS = "import ctypes, sys, runpy; ctypes.CDLL('libc.so.6').mallopt(-3, 65536); sys.argv[0] = 'streamprune'; " \
           "runpy.run_module('streamprune', run_name='__main__')"


def prune(setting: str, args: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "streamprune"] if setting == "current" else [sys.executable, "-c", PREVIOUS]
    t = time.perf_counter()
    p = subprocess.run(cmd + ["prune", *map(str, args), "--json", "--no-progress", "--overwrite"], cwd=REPO,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return seconds, json.loads(p.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/streamprune-allocator")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "allocator.json"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from tiny import make_checkpoint, write_ids, write_windows

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4,
                 vocab_size=512, shard_size="50MB")
    models = {n: make_checkpoint(work / f"m{n}", "llama", num_hidden_layers=n, **shape) for n in (2, 8)}
    small_calib = write_ids(work / "ids.jsonl", 4, 64, vocab=512)
    smol = build_smollm2()
    smol_calib = write_windows(work / "smol.jsonl", calibration_windows(WIKITEXT, smol, 16, 256, 0, 49152))
    runs = {"current": {"rss_2": [], "rss_8": [], "smollm2_seconds": []},
            "previous": {"rss_2": [], "rss_8": [], "smollm2_seconds": []}}
    for r in range(a.rounds):
        for setting in (("current", "previous") if r % 2 == 0 else ("previous", "current")):
            for n, m in models.items():
                _, s = prune(setting, [m, work / "out", "--calib", small_calib, "--nsamples", "4", "--seqlen", "64"])
                runs[setting][f"rss_{n}"].append(s["peak_rss_bytes"])
            seconds, _ = prune(setting, [smol, work / "out", "--calib", smol_calib, "--nsamples", "16", "--seqlen",
                                         "256", "--dtype", "float32", "--device", "cpu"])
            runs[setting]["smollm2_seconds"].append(seconds)
            print(f"round {r} {setting}: rss 2 blocks {runs[setting]['rss_2'][-1] / 2**20:.1f} MiB, 8 blocks "
                  f"{runs[setting]['rss_8'][-1] / 2**20:.1f} MiB, SmolLM2 {seconds:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = {k: {"peak_rss_2_blocks_mib": min(v["rss_2"]) / 2 ** 20, "peak_rss_8_blocks_mib": min(v["rss_8"]) / 2 ** 20,
                   "ratio_8_over_2": min(v["rss_8"]) / min(v["rss_2"]), "smollm2_best_seconds": min(v["smollm2_seconds"])}
               for k, v in runs.items()}
    Path(a.results).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    print("| setting | peak RSS, 2 blocks | 8 blocks | 8 / 2 | SmolLM2 job, best |")
    print("|---|---:|---:|---:|---:|")
    for k, v in summary.items():
        print(f"| {k} | {v['peak_rss_2_blocks_mib']:.1f} MiB | {v['peak_rss_8_blocks_mib']:.1f} MiB | "
              f"{v['ratio_8_over_2']:.3f} | {v['smollm2_best_seconds']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
