"""Whole-process wall time of streamprune against the same job in memory and in llm-compressor (the peer).

The job: SmolLM2-135M, 16 x 256 calibration tokens (the same pinned windows for every side, drawn from
WikiText-2 valid with seed 0 and written once as JSONL), float32 on the CPU, Wanda 50% unstructured, batch 1.
Each side is one fresh process, timed from outside (start-up, imports and saving included):

* streamprune: `python -m streamprune prune MODEL OUT --calib windows.jsonl ... --json`;
* in-memory: the same algorithm with the whole model loaded (`from_pretrained` float32, block-0 inputs caught
  by a pre-hook, then per layer streamprune's own statistics hooks, Wanda masks and a propagation pass, and
  `save_pretrained` in bf16), in a process given streamprune's own process settings (garbage collection off
  while importing, then on for new objects only; no interpreter teardown): what streaming alone costs;
* llm-compressor 0.14 (`benchmarks/peer_llmcompressor.py` in `.venv-peer`, made by `benchmarks/peer_setup.sh`),
  when that venv exists.

Runs rotate (S M P, M P S, P S M, ...), so a slow phase of the machine hits every side; the minimum of each side
counts, medians are recorded too. The outputs are compared tensor by tensor. Run it alone on the machine.

    python benchmarks/throughput.py                        # 3 rounds
    python benchmarks/throughput.py --rounds 1 --nsamples 4 --seqlen 64    # a quick check
    python benchmarks/throughput.py --sides streamprune streamprune@/tmp/old in_memory   # A/B against a copy
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
PEER_PY = REPO / ".venv-peer" / "bin" / "python"


class _Caught(Exception):
    pass


def run_in_memory(model_dir: str, out: str, calib: str, nsamples: int, seqlen: int) -> None:
    """The algorithm of `streamprune prune` with the whole model in memory (this process is timed from outside)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from streamprune.calibration import calibration_windows
    from streamprune.methods import Structure, Wanda
    from streamprune.statistics import BlockStatistics

    with torch.no_grad():
        ckpt_dtype = AutoConfig.from_pretrained(model_dir).get_text_config().dtype or torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        ids = calibration_windows(calib, Path(model_dir), nsamples, seqlen, 0, model.config.vocab_size)
        layers = model.model.layers
        inps, kws = [], []

        def catcher(module, args, kwargs):
            inps.append(args[0] if args else kwargs.pop("hidden_states"))
            kws.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Caught

        handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
        for s in range(nsamples):
            try:
                model(input_ids=ids[s:s + 1], use_cache=False)
            except _Caught:
                pass
        handle.remove()
        inps = torch.cat(inps)
        outs = torch.empty_like(inps)
        wanda, structure = Wanda(), Structure()

        def forward(layer, s):
            y = layer(inps[s:s + 1], **kws[s])
            return y[0] if isinstance(y, (tuple, list)) else y

        for layer in layers:
            with BlockStatistics(layer, wanda.needs) as stats:
                for s in range(nsamples):
                    try:
                        forward(layer, s)
                        stats.forward_done()
                    except Exception as e:  # StopForward: the statistics are complete for this sequence
                        if type(e).__name__ != "StopForward":
                            raise
            for t in stats.targets:
                t.weight.masked_fill_(wanda.prune(t.weight, stats.pop((t.name, None)), 0.5, structure, 0).mask, 0)
            for s in range(nsamples):
                outs[s:s + 1] = forward(layer, s)
            inps, outs = outs, inps
        inps = outs = kws = None
        model.to(ckpt_dtype).save_pretrained(out)


def side_command(side: str, model_dir: Path, out: Path, calib: Path, nsamples: int, seqlen: int) -> list[str]:
    if side.split("@")[0] == "streamprune":  # "streamprune@DIR": the package in DIR (a change against the last)
        env = ["env", f"PYTHONPATH={side.split('@', 1)[1]}"] if "@" in side else []
        return env + [sys.executable, "-m", "streamprune", "prune", str(model_dir), str(out), "--calib", str(calib),
                      "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--dtype", "float32", "--device", "cpu",
                      "--no-progress", "--json"]
    if side == "in_memory":
        return [sys.executable, str(Path(__file__).resolve()), "_in_memory", str(model_dir), str(out), str(calib),
                str(nsamples), str(seqlen)]
    return [str(PEER_PY), str(REPO / "benchmarks" / "peer_llmcompressor.py"), "--model", str(model_dir), "--calib",
            str(calib), "--out", str(out), "--nsamples", str(nsamples), "--seqlen", str(seqlen)]


def timed(cmd: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{cmd[:4]} failed:\n{p.stderr[-3000:]}")
    r = {"seconds": seconds, "loadavg_before": load,  # CPU seconds of all its threads: less noisy than wall time
         "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    last = [line for line in p.stdout.strip().splitlines() if line.strip()]
    text = p.stdout[p.stdout.find("{"):] if p.stdout.lstrip().startswith("{") else (last[-1] if last else "")
    try:
        info = json.loads(text)
        r["reported"] = {k: info[k] for k in ("wall_seconds", "seconds", "phase_seconds", "peak_rss_bytes")
                         if k in info}
    except ValueError:
        pass
    return r


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor equality of two checkpoints, and how many block-linear zero entries differ."""
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    differ = [n for n in common if ta[n].dtype != tb[n].dtype or not bool((ta[n] == tb[n]).all())]
    masks = [n for n in common if ".layers." in n and ta[n].dim() == 2]
    flips = sum(int(((ta[n] == 0) != (tb[n] == 0)).sum()) for n in masks)
    return {"tensors_compared": len(common), "tensors_differing": len(differ), "first_differing": differ[:3],
            "mask_entries_differing": flips, "mask_entries": sum(ta[n].numel() for n in masks)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; every side runs once per round")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sides", nargs="+", default=["streamprune", "in_memory", "llm_compressor"])
    ap.add_argument("--workdir", default="/tmp/streamprune-throughput")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "throughput.json"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2

    sides = [s for s in a.sides if s != "llm_compressor" or PEER_PY.is_file()]
    if "llm_compressor" in a.sides and "llm_compressor" not in sides:
        print(f"llm-compressor left out: {PEER_PY} not found (bash benchmarks/peer_setup.sh)", file=sys.stderr)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = build_smollm2()
    ids = calibration_windows(WIKITEXT, model_dir, a.nsamples, a.seqlen, 0, 49152)
    calib = work / "windows.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    runs = {s: [] for s in sides}
    order = []
    for r in range(a.rounds):
        round_order = sides[r % len(sides):] + sides[:r % len(sides)]
        order.append(round_order)
        for side in round_order:
            out = work / side.replace("/", "_")  # "streamprune@/a/b" names a folder inside work, never /a/b
            res = timed(side_command(side, model_dir, out, calib, a.nsamples, a.seqlen), out)
            runs[side].append(res)
            print(f"round {r}: {side:<15} {res['seconds']:6.2f} s, cpu {res['cpu_seconds']:6.2f} s "
                  f"(load {res['loadavg_before']:.2f})",
                  file=sys.stderr, flush=True)
    checks = {f"{s} vs streamprune": compare(work / "streamprune", work / s.replace("/", "_")) for s in sides if s != "streamprune"}
    best = {s: min(x["seconds"] for x in v) for s, v in runs.items()}
    result = {
        "job": {"model": "SmolLM2-135M (demo build, bf16)", "calibration": f"{a.nsamples} x {a.seqlen} WikiText-2 valid "
                "windows, seed 0", "compute": "float32, CPU, batch 1", "method": "wanda 50% unstructured"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "order": order, "runs": runs, "best_seconds": best,
        "median_seconds": {s: statistics.median(x["seconds"] for x in v) for s, v in runs.items()},
        "ratios": {f"streamprune / {s}": best["streamprune"] / best[s] for s in sides if s != "streamprune"},
        "outputs": checks,
    }
    Path(a.results).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print("| side | best s | median s | all runs (s) |")
    print("|---|---:|---:|---|")
    for s, v in runs.items():
        every = ", ".join("%.2f" % x["seconds"] for x in v)
        print(f"| {s} | {best[s]:.2f} | {result['median_seconds'][s]:.2f} | {every} |")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3f}")
    for k, v in checks.items():
        print(f"{k}: {v['tensors_differing']} of {v['tensors_compared']} tensors differ, "
              f"{v['mask_entries_differing']} of {v['mask_entries']} mask entries")
    print(f"raw: {a.results}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_in_memory":
        import gc

        gc.disable()
        model_dir, out, calib, n, L = sys.argv[2:7]
        sys.path.insert(0, str(REPO))
        from streamprune.runtime import collect_new_only

        with collect_new_only():
            run_in_memory(model_dir, out, calib, int(n), int(L))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        sys.exit(main())
