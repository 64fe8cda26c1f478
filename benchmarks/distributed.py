"""Wall time of one process against two data-parallel processes (torchrun, gloo) on a synthetic model, CPU.

    python benchmarks/distributed.py [--layers 4] [--hidden 1024] [--nsamples 16] [--seqlen 256]

Both runs prune the same checkpoint with the same settings in the same invocation; the single process gets
both cores (2 threads), each of the two ranks gets one (torchrun's OMP_NUM_THREADS=1). Prints the times, the
ratio, whether the outputs are byte-identical, and writes benchmarks/results/distributed.json.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def run(cmd, env=None):
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    return time.perf_counter() - t, json.loads(res.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args()
    from tiny import make_checkpoint, write_ids

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_checkpoint(tmp / "model", "llama", num_hidden_layers=a.layers, hidden_size=a.hidden,
                                intermediate_size=4 * a.hidden, num_attention_heads=a.hidden // 64,
                                num_key_value_heads=a.hidden // 256, vocab_size=1024, shard_size="200MB")
        calib = write_ids(tmp / "ids.jsonl", a.nsamples, a.seqlen, vocab=1024)
        base = [sys.executable, "-m", "streamprune", "prune", str(model), "--calib", str(calib), "--nsamples",
                str(a.nsamples), "--seqlen", str(a.seqlen), "--json", "--no-progress"]
        t1, s1 = run(base[:5] + [str(tmp / "one")] + base[5:])
        t2, s2 = run(base[:5] + [str(tmp / "two")] + base[5:] + ["--nproc", "2"])
        same = all(hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((tmp / "two" / f.name).read_bytes()).digest()
                   for f in (tmp / "one").glob("*.safetensors"))
    result = {"layers": a.layers, "hidden": a.hidden, "nsamples": a.nsamples, "seqlen": a.seqlen,
              "one_process_s": round(t1, 2), "two_processes_s": round(t2, 2), "speedup": round(t1 / t2, 3),
              "identical_output": same, "one_phase_s": s1["phase_seconds"], "two_phase_s_rank0": s2["phase_seconds"],
              "cpus": os.cpu_count()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "distributed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
