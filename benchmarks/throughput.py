"""Wall time of streamprune against the same Wanda algorithm with the whole model in memory.

Both runs go from a checkpoint directory to a pruned checkpoint on disk, on the same machine, with the same
calibration windows, compute dtype (float32 on CPU), batch size 1 and sdpa attention:

* streamed: `streamprune.pipeline.prune(...)` (one block in memory, read-ahead and writer threads);
* in-memory: `from_pretrained` of the whole model in float32, block-0 inputs captured by a forward pre-hook on
  the first decoder layer that raises (hidden states and kwargs per sequence, use_cache=False), then for every
  layer a statistics pass with streamprune.wanda.InputStats hooks, wanda_mask on every linear (whole matrix, no
  row chunks, as the reference does), a propagation pass, and finally `save_pretrained` in the checkpoint dtype.

Every run is a fresh subprocess (so allocator settings and caches of one run do not leak into the other), runs
alternate (S, M, M, S, ...) and the minimum of each is compared. Other work on the machine slows both alike only
on average: the load average before each run is recorded.

    python benchmarks/throughput.py                       # SmolLM2-135M (32 x 512) and synthetic 8 x 1B-class blocks
    python benchmarks/throughput.py --cases smollm2 --repeats 1 --nsamples 4 --seqlen 128   # quick check
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
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

WIKITEXT = "/work/shared/data/wikitext-2/valid.txt"
SYNTH = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16, "num_key_value_heads": 8,
         "max_position_embeddings": 4096}
SYNTH_TINY = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096}


# ------------------------------------------------------------------------------------------ the two runs

def run_streamed(model_dir: str, out: str, calib: str, nsamples: int, seqlen: int) -> dict:
    import torch  # noqa: F401 - imported before the clock starts, as in the in-memory run

    import transformers  # noqa: F401

    from streamprune.pipeline import prune

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = prune(model_dir, out, calib=calib, nsamples=nsamples, seqlen=seqlen, device="cpu", dtype="float32",
              progress=False, overwrite=True, log=lambda m: None)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "wall_seconds_reported": s["wall_seconds"], "phase_seconds": s["phase_seconds"],
            "peak_rss_bytes": s["peak_rss_bytes"], "sparsity": s["sparsity"], "activations": s["activations"]}


class _Caught(Exception):
    pass


def run_in_memory(model_dir: str, out: str, calib: str, nsamples: int, seqlen: int) -> dict:
    import resource

    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    from streamprune.calibration import calibration_windows
    from streamprune.wanda import InputStats, Structure, wanda_mask

    shutil.rmtree(out, ignore_errors=True)
    phases = {}
    t0 = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - t
        t = now

    with torch.no_grad():
        config = AutoConfig.from_pretrained(model_dir)
        text = config.get_text_config()
        ids = calibration_windows(calib, Path(model_dir), nsamples, seqlen, 0, text.vocab_size)
        lap("calibration")
        ckpt_dtype = text.dtype or torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        lap("load")
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
        lap("capture")
        structure = Structure()

        def forward(layer, s):
            y = layer(inps[s:s + 1], **kws[s])
            return y[0] if isinstance(y, (tuple, list)) else y

        for layer in layers:
            stats = InputStats(layer)
            for s in range(nsamples):
                forward(layer, s)
            stats.remove()
            lap("statistics")
            for name, lin in stats.linears.items():
                mask = wanda_mask(lin.weight, stats.scaler[name], 0.5, structure)
                lin.weight.data.masked_fill_(mask, 0)
                del mask
            lap("prune")
            for s in range(nsamples):
                outs[s:s + 1] = forward(layer, s)
            inps, outs = outs, inps
            lap("propagate")
        inps = outs = kws = None  # free the activations before saving
        model.to(ckpt_dtype).save_pretrained(out)
        lap("write")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ------------------------------------------------------------------------------------------ comparison

def compare_checkpoints(a: str, b: str) -> dict:
    """Tensor-by-tensor equality of two checkpoints (names both hold); zero patterns of the block linears."""
    from streamprune.shards import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    common = sorted(set(ca.tensors) & set(cb.tensors))
    differ, mask_diff, mask_total, zeros = [], 0, 0, 0
    for name in common:
        x, y = ca.read(name), cb.read(name)
        if x.shape != y.shape or x.dtype != y.dtype or not bool((x.view(-1).view(torch_uint(x)) ==
                                                                  y.view(-1).view(torch_uint(y))).all()):
            differ.append(name)
        if ".layers." in name and name.endswith("proj.weight"):
            mx, my = x == 0, y == 0
            mask_diff += int((mx != my).sum())
            mask_total += mx.numel()
            zeros += int(mx.sum())
    only = sorted(set(ca.tensors) ^ set(cb.tensors))
    return {"tensors_compared": len(common), "tensors_differing": len(differ), "first_differing": differ[:5],
            "only_in_one": only, "mask_entries_differing": mask_diff, "mask_entries": mask_total,
            "sparsity": zeros / mask_total if mask_total else None, "identical": not differ}


def torch_uint(t):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def loadavg() -> list:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def child(kind: str, model_dir: str, out: str, calib: str, nsamples: int, seqlen: int, result: str) -> None:
    import resource

    fn = run_streamed if kind == "streamed" else run_in_memory
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    r = fn(model_dir, out, calib, nsamples, seqlen)
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time of the run itself (all threads): less sensitive than wall time to other work on a shared machine
    r.update(cpu_user_seconds=u1.ru_utime - u0.ru_utime, cpu_sys_seconds=u1.ru_stime - u0.ru_stime,
             minor_faults=u1.ru_minflt - u0.ru_minflt)
    Path(result).write_text(json.dumps(r))


def run_child(kind: str, model_dir, out, calib, nsamples, seqlen, work: Path) -> dict:
    result = work / f"result-{kind}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, str(model_dir), str(out), str(calib),
           str(nsamples), str(seqlen), str(result)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load = loadavg()
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{p.stderr[-3000:]}")
    r = json.loads(result.read_text())
    result.unlink()
    r["process_seconds"] = time.perf_counter() - t
    r["loadavg_before"] = load
    r["loadavg_after"] = loadavg()
    return r


def bench_case(name: str, model_dir: Path, calib: str, nsamples: int, seqlen: int, repeats: int, work: Path,
               check: bool) -> dict:
    outs = {"streamed": work / f"{name}-streamed", "in_memory": work / f"{name}-in-memory"}
    runs = {"streamed": [], "in_memory": []}
    order = []
    for r in range(repeats):
        order += ["streamed", "in_memory"] if r % 2 == 0 else ["in_memory", "streamed"]
    for kind in order:
        r = run_child("streamed" if kind == "streamed" else "in_memory", model_dir, outs[kind], calib, nsamples,
                      seqlen, work)
        runs[kind].append(r)
        print(f"  [{name}] {kind:<9} {r['seconds']:7.1f}s  (process {r['process_seconds']:.1f}s, load "
              f"{r['loadavg_before'][0] if r['loadavg_before'] else '-'}) phases {r['phase_seconds']}",
              file=sys.stderr, flush=True)
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items()}
    ratio = best["streamed"]["seconds"] / best["in_memory"]["seconds"]
    res = {"model": str(model_dir), "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "order": order,
           "runs": runs, "best_seconds": {k: v["seconds"] for k, v in best.items()}, "ratio_streamed_over_in_memory": ratio,
           "streamed_phase_seconds": best["streamed"]["phase_seconds"],
           "in_memory_phase_seconds": best["in_memory"]["phase_seconds"]}
    if check:
        res["weights_check"] = compare_checkpoints(str(outs["streamed"]), str(outs["in_memory"]))
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["smollm2", "synthetic"], choices=["smollm2", "synthetic"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each kind (alternating order); the min counts")
    ap.add_argument("--nsamples", type=int, default=32, help="SmolLM2 calibration sequences")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--syn-nsamples", type=int, default=16)
    ap.add_argument("--syn-seqlen", type=int, default=512)
    ap.add_argument("--syn-blocks", type=int, default=8)
    ap.add_argument("--syn-vocab", type=int, default=32000)
    ap.add_argument("--tiny", action="store_true", help="shrunken synthetic shape (smoke test)")
    ap.add_argument("--workdir", default="/tmp/streamprune-throughput")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "throughput.json"))
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
               "cases": {}}
    try:
        if "smollm2" in a.cases:
            from streamprune.demo import build_smollm2

            model_dir = build_smollm2()
            print(f"SmolLM2-135M ({model_dir}), {a.nsamples} x {a.seqlen} tokens of {WIKITEXT}, float32 CPU",
                  file=sys.stderr, flush=True)
            results["cases"]["smollm2"] = bench_case("smollm2", model_dir, WIKITEXT, a.nsamples, a.seqlen, a.repeats,
                                                     work, check=True)
        if "synthetic" in a.cases:
            from synthetic import make_synthetic, write_calibration

            shape = SYNTH_TINY if a.tiny else SYNTH
            model_dir = work / "synthetic"
            shutil.rmtree(model_dir, ignore_errors=True)
            gen = make_synthetic(model_dir, "70b", a.syn_blocks, vocab_size=a.syn_vocab, overrides=shape)
            calib = write_calibration(work / "synthetic-calib.jsonl", a.syn_nsamples, a.syn_seqlen, a.syn_vocab)
            print(f"synthetic {a.syn_blocks} blocks {shape}, vocab {a.syn_vocab}, {gen['bytes'] / 1e9:.2f} GB bf16, "
                  f"{a.syn_nsamples} x {a.syn_seqlen} random tokens, float32 CPU", file=sys.stderr, flush=True)
            res = bench_case("synthetic", model_dir, str(calib), a.syn_nsamples, a.syn_seqlen, a.repeats, work,
                             check=True)
            res.update(shape=shape, blocks=a.syn_blocks, vocab=a.syn_vocab, checkpoint_bytes=gen["bytes"])
            results["cases"]["synthetic"] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)

    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(results, indent=1) + "\n")
    print("| case | tokens | streamed s | in-memory s | ratio | streamprune phases (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results["cases"].items():
        ph = ", ".join(f"{k} {v:.1f}" for k, v in r["streamed_phase_seconds"].items())
        print(f"| {name} | {r['nsamples']} x {r['seqlen']} | {r['best_seconds']['streamed']:.1f} | "
              f"{r['best_seconds']['in_memory']:.1f} | {r['ratio_streamed_over_in_memory']:.3f} | {ph} |")
    for name, r in results["cases"].items():
        ph = ", ".join(f"{k} {v:.1f}" for k, v in r["in_memory_phase_seconds"].items())
        print(f"{name}: in-memory phases (s): {ph}")
        all_s = {k: [round(x['seconds'], 1) for x in v] for k, v in r["runs"].items()}
        print(f"{name}: all runs (s): {all_s}")
        w = r.get("weights_check")
        if w:
            print(f"{name}: streamed vs in-memory weights: {'IDENTICAL' if w['identical'] else 'DIFFERENT'} "
                  f"({w['tensors_compared']} tensors, {w['tensors_differing']} differ; zero-pattern entries differing "
                  f"{w['mask_entries_differing']} of {w['mask_entries']}; sparsity {w['sparsity']})")
    print(f"raw results: {a.results}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, model_dir, out, calib, n, L, result = sys.argv[2:9]
        child(kind, model_dir, out, calib, int(n), int(L), result)
    else:
        sys.exit(main())
