"""Edge deployment: what structured width buys on SmolLM2-135M, beside the dense and the unstructured-Wanda models.

For each model: parameters and file size (from the written shards), WikiText-2 perplexity (the first 10 windows
of 512 tokens of *test*, streamed by streamprune.evaluate() in float32), and CPU decode speed: transformers
`generate`, batch 1, greedy, exactly 128 new tokens after a 32-token prompt, float32, every model measured in
turn within each round (alternating, so load drifts hit all alike), best of the rounds. Width models with and
without compensation have the same shapes, so their speed is measured once per width.

Calibration: 16 windows x 256 tokens drawn with seed 0 from WikiText-2 *valid* (benchmarks/throughput.py's job).
Each prune runs in its own process (`python -m streamprune prune ... --json`); its wall time and peak RSS are
from its summary. Run it alone on the machine:

    python benchmarks/edge.py                 # ~15 min on 2 cores; writes results/edge.json and prints a table
    python benchmarks/edge.py --rounds 5      # more decode rounds
    python benchmarks/edge.py --nsamples 128 --seqlen 512 --no-speed --out benchmarks/results/edge-128x512.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2"
sys.path.insert(0, str(REPO))

# name -> prune options (None: the dense model)
MODELS = {
    "dense": None,
    "wanda 50% unstructured": ["--sparsity", "0.5"],
    "width 20%, no compensation": ["--structure", "width", "--sparsity", "0.2", "--no-width-compensation"],
    "width 20%": ["--structure", "width", "--sparsity", "0.2"],
    "width 40%, no compensation": ["--structure", "width", "--sparsity", "0.4", "--no-width-compensation"],
    "width 40%": ["--structure", "width", "--sparsity", "0.4"],
}


def shard_stats(d: Path) -> tuple[int, int]:
    """(parameters, bytes of the safetensors files)."""
    from safetensors import safe_open

    params = size = 0
    for f in sorted(d.glob("*.safetensors")):
        size += f.stat().st_size
        with safe_open(f, "pt") as h:
            for k in h.keys():
                n = 1
                for s in h.get_slice(k).get_shape():
                    n *= s
                params += n
    return params, size


def decode_speed(dirs: dict, rounds: int, prompt) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    models = {n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in dirs.items()}
    best = {n: 0.0 for n in models}
    with torch.no_grad():
        for n, m in models.items():  # warm-up
            m.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for r in range(rounds):
            for n, m in models.items():
                t = time.perf_counter()
                out = m.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
                dt = time.perf_counter() - t
                assert out.shape[1] == prompt.shape[1] + 128
                best[n] = max(best[n], 128 / dt)
                print(f"  round {r}: {n} {128 / dt:.1f} tokens/s", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (benchmarks/throughput.py's: 16)")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration window length "
                    "(benchmarks/throughput.py's: 256)")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode timing (it does not depend on "
                    "the calibration)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "edge.json")
    args = ap.parse_args()

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2
    from streamprune.evaluation import evaluate, make_windows, read_token_stream

    model = build_smollm2()
    work = Path(tempfile.mkdtemp(prefix="streamprune-edge-"))
    cfg = json.loads((model / "config.json").read_text())
    calib = calibration_windows(str(WIKITEXT / "valid.txt"), model, args.nsamples, args.seqlen, 0,
                                cfg["vocab_size"])
    calib_file = work / "calib.jsonl"
    calib_file.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in calib.tolist()))

    results, dirs = {}, {}
    for name, opts in MODELS.items():
        d = model
        entry = {}
        if opts is not None:
            d = work / name.replace(" ", "_").replace(",", "").replace("%", "")
            cmd = [sys.executable, "-m", "streamprune", "prune", str(model), str(d), "--calib", str(calib_file),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json", "--no-progress", *opts]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{name}: {res.stderr}")
            s = json.loads(res.stdout)
            entry.update(prune_seconds=s["wall_seconds"], prune_peak_rss=s["peak_rss_bytes"],
                         intermediate_size=s.get("intermediate_size", {}).get("after"))
        dirs[name] = d
        entry["params"], entry["bytes"] = shard_stats(d)
        entry["ppl"] = evaluate(d, WIKITEXT / "test.txt", seqlen=512, windows=10, progress=False)["ppl"]
        print(f"{name}: {entry}", flush=True)
        results[name] = entry

    import torch

    prompt = make_windows(read_token_stream(WIKITEXT / "test.txt", model), 32, 1, "test")[:1]
    timed = {n: dirs[n] for n in MODELS if "no compensation" not in n}
    speed = {n: None for n in timed} if args.no_speed else decode_speed(timed, args.rounds, prompt)
    for n in results:
        results[n]["decode_tokens_per_s"] = speed[n if n in speed else n.replace(", no compensation", "")]

    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                cpus=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds,
                calibration=f"{args.nsamples} x {args.seqlen}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    dense = results["dense"]
    print("\n| model | MLP width | parameters | file | perplexity | decode tokens/s | vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        speed = r["decode_tokens_per_s"]
        timing = "- | -" if args.no_speed else f"{speed:.1f} | {speed / dense['decode_tokens_per_s'] - 1:+.0%}"
        print(f"| {n} | {r.get('intermediate_size') or cfg['intermediate_size']} | {r['params'] / 1e6:.1f} M | "
              f"{r['bytes'] / 2**20:.0f} MiB | {r['ppl']:.2f} | {timing} |")


if __name__ == "__main__":
    main()
