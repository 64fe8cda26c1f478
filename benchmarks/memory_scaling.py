"""Peak host memory of a CPU prune against the number of blocks, and against `streamprune plan`'s prediction.

For each block count: a Llama-2-70B-shaped synthetic checkpoint (bf16, vocab 1024) is generated with
benchmarks/synthetic.py, pruned on CPU in a subprocess (`python -m streamprune prune ... --json`), planned with
`streamprune plan ... --json --host-memory 24GB`, and deleted. Peak RSS must not grow with the block count.

    python benchmarks/memory_scaling.py                       # 2, 4, 8 blocks of 70B shape (about 35 min here)
    python benchmarks/memory_scaling.py --blocks 2 --diagnose 2   # + a run with RSS peaks per pipeline phase
    python benchmarks/memory_scaling.py --tiny                # a 1-minute smoke test with a shrunken shape
    python benchmarks/memory_scaling.py --replan              # re-predict stored results with the current planner.py

`--diagnose N` reruns the N-block prune with an Observer that tags every RSS sample with the phase the main
thread is in (read / statistics / prune / propagate ...) and what the I/O thread is doing (read_block / write),
which is how a wrong term of the memory model is found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

GB = 1e9
GiB = 1024 ** 3
CONFIG = str(REPO.parent / "shared" / "data" / "configs" / "llama-2-70b.json")
TINY = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class ChildSampler:
    """Samples a child process's RSS (and shared = file-backed) from outside, as a cross-check of its own report."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_anon = 0
        self.timeline = []  # (seconds, rss) every ~1 s
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last = -1.0
        while not self._stop.wait(self.interval):
            try:
                m = self.proc.memory_info()
            except Exception:  # noqa: BLE001 - the child exited
                return
            self.peak_rss = max(self.peak_rss, m.rss)
            self.peak_anon = max(self.peak_anon, m.rss - m.shared)
            t = time.perf_counter() - self._t0
            if t - last >= 1.0:
                self.timeline.append((round(t, 1), m.rss))
                last = t

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_json(cmd: list[str], sample: bool = False, timeout: float | None = None) -> tuple[dict, dict]:
    """Run a command whose stdout is one JSON document; return (document, {"seconds", "external_peak_rss"...})."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    sampler = ChildSampler(p.pid) if sample else None
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if sampler:
            sampler.stop()
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    extra = {"seconds": seconds}
    if sampler:
        extra.update(external_peak_rss_bytes=sampler.peak_rss, external_peak_anon_bytes=sampler.peak_anon,
                     rss_timeline=sampler.timeline)
    return json.loads(out), extra


# ------------------------------------------------------------------------------------------ phase diagnosis

def phase_child(argv: list[str]) -> None:
    """Run `streamprune <argv>` in this process with every RSS sample tagged by the phase the main thread is in
    and the phases the I/O thread is in, through an Observer (streamprune.runtime)."""
    import contextlib

    from streamprune.cli import main
    from streamprune.runtime import Observer

    page = os.sysconf("SC_PAGE_SIZE")
    state = {"main": "startup", "background": set()}
    peaks: dict[str, dict] = {}
    lock = threading.Lock()

    def sample():
        with open("/proc/self/statm") as f:
            _, rss, shared = (int(x) for x in f.read().split()[:3])
        with lock:
            bg = "+".join(sorted(state["background"]))
            key = state["main"] + (f" [{bg}]" if bg else "")
            p = peaks.setdefault(key, {"rss": 0, "anon": 0, "file": 0, "samples": 0})
            p["rss"] = max(p["rss"], rss * page)
            p["anon"] = max(p["anon"], (rss - shared) * page)
            p["file"] = max(p["file"], shared * page)
            p["samples"] += 1

    class Tagging(Observer):
        @contextlib.contextmanager
        def phase(self, name, device=None):
            main_thread = threading.current_thread() is threading.main_thread()
            with lock:
                prev = state["main"]
                if main_thread:
                    state["main"] = name
                else:
                    state["background"].add(name)
            sample()
            try:
                with super().phase(name, device):
                    yield
            finally:
                sample()
                with lock:
                    if main_thread:
                        state["main"] = prev
                    else:
                        state["background"].discard(name)

    stop = threading.Event()

    def loop():
        while not stop.wait(0.005):
            sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    import streamprune.job as job

    original = job.prune
    job.prune = lambda model, out, **kw: original(model, out, observer=Tagging(progress=False), **kw)
    try:
        main(argv, standalone_mode=True)
    finally:
        stop.set()
        thread.join()
        with open(os.environ["PHASE_RSS_OUT"], "w") as f:
            json.dump(peaks, f, indent=1)


# ------------------------------------------------------------------------------------------ the benchmark

def fmt_gb(n) -> str:
    return "-" if n is None else f"{n / GB:.2f} GB"


def measure(n: int, work: Path, calib: Path, a, overrides: dict) -> dict:
    from synthetic import make_synthetic

    ckpt, out = work / f"ckpt-{n}", work / f"out-{n}"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{n} blocks] generating {ckpt} ...", file=sys.stderr, flush=True)
    gen = make_synthetic(ckpt, a.config, n, vocab_size=a.vocab, overrides=overrides)
    row = {"blocks": n, "checkpoint_bytes": gen["bytes"], "block_bytes": gen["block_bytes"],
           "generate_seconds": round(gen["seconds"], 1)}
    try:
        plan, _ = run_json([sys.executable, "-m", "streamprune", "plan", str(ckpt), "--json", "--nsamples", str(a.nsamples),
                            "--seqlen", str(a.seqlen), "--host-memory", a.host_memory])
        row["plan"] = plan["plan"]
        row["predicted_peak_host_bytes"] = plan["plan"]["peak_host_bytes"]
        cmd = [sys.executable, "-m", "streamprune", "prune", str(ckpt), str(out), "--calib", str(calib),
               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", "cpu", "--activations", "cpu",
               "--json", "--no-progress"]
        print(f"[{n} blocks] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        summary, extra = run_json(cmd, sample=True)
        summary.pop("block_sparsity", None)
        row.update(wall_seconds=summary["wall_seconds"], process_seconds=round(extra["seconds"], 2),
                   seconds_per_block=summary["wall_seconds"] / n, phase_seconds=summary["phase_seconds"],
                   peak_rss_bytes=summary["peak_rss_bytes"], peak_rss_sampled_bytes=summary.get("peak_rss_sampled_bytes"),
                   peak_anon_bytes=summary["peak_anon_bytes"], peak_file_backed_bytes=summary["peak_file_backed_bytes"],
                   external_peak_rss_bytes=extra["external_peak_rss_bytes"], rss_timeline=extra["rss_timeline"],
                   sparsity=summary["sparsity"], prune_plan=summary.get("plan"))
        row["error_pct"] = 100.0 * (row["predicted_peak_host_bytes"] - row["peak_rss_bytes"]) / row["peak_rss_bytes"]
        print(f"[{n} blocks] wall {row['wall_seconds']:.1f}s, peak RSS {fmt_gb(row['peak_rss_bytes'])}, "
              f"predicted {fmt_gb(row['predicted_peak_host_bytes'])} ({row['error_pct']:+.1f}%)", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if n in a.diagnose:
            phase_out = work / f"phases-{n}.json"
            dcmd = [sys.executable, str(Path(__file__).resolve()), "_phase_child"] + cmd[3:]
            print(f"[{n} blocks] diagnostic run with phase-tagged RSS ...", file=sys.stderr, flush=True)
            os.environ["PHASE_RSS_OUT"] = str(phase_out)
            try:
                dsum, _ = run_json(dcmd)
            finally:
                os.environ.pop("PHASE_RSS_OUT", None)
            row["phase_peaks"] = json.loads(phase_out.read_text())
            row["diagnostic_peak_rss_bytes"] = dsum["peak_rss_bytes"]
            phase_out.unlink()
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ckpt, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| blocks | checkpoint | wall s | s/block | peak RSS | anon | file-backed | predicted | error |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['blocks']} | {fmt_gb(r['checkpoint_bytes'])} | {r['wall_seconds']:.1f} | "
                     f"{r['seconds_per_block']:.1f} | {fmt_gb(r['peak_rss_bytes'])} | {fmt_gb(r['peak_anon_bytes'])} | "
                     f"{fmt_gb(r['peak_file_backed_bytes'])} | {fmt_gb(r['predicted_peak_host_bytes'])} | "
                     f"{r['error_pct']:+.1f}% |")
    return "\n".join(lines)


def phase_table(peaks: dict) -> str:
    lines = ["| main-thread phase [busy background threads] | peak RSS | peak anon | samples |", "|---|---:|---:|---:|"]
    for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]["rss"]):
        lines.append(f"| {k} | {fmt_gb(v['rss'])} | {fmt_gb(v['anon'])} | {v['samples']} |")
    return "\n".join(lines)


def replan(results_path: str, host_memory: str) -> dict:
    """Recompute the predictions of stored rows with the current planner.py: config.json + index only, no weights."""
    import tempfile

    from synthetic import load_config_dict

    from streamprune.planner import plan_for

    res = json.loads(Path(results_path).read_text())
    shape, st = res["shape"], res["settings"]
    for r in res["rows"]:
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config_dict(shape["config"])
            cfg.update(shape.get("overrides") or {})
            cfg.update(num_hidden_layers=r["blocks"], vocab_size=shape["vocab"], dtype=shape["dtype"])
            cfg.pop("torch_dtype", None)
            (Path(d) / "config.json").write_text(json.dumps(cfg))
            (Path(d) / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": r["checkpoint_bytes"]}, "weight_map": {}}))
            p = plan_for(d, host_memory=host_memory, nsamples=st["nsamples"], seqlen=st["seqlen"])["plan"]
        r.setdefault("predicted_peak_host_bytes_first_run", r["predicted_peak_host_bytes"])
        r["predicted_peak_host_bytes"] = p["peak_host_bytes"]
        r["plan"] = p
        r["error_pct"] = 100.0 * (p["peak_host_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
    Path(results_path).write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--diagnose", type=int, nargs="*", default=[], help="block counts to rerun with phase-tagged RSS")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--host-memory", default="24GB")
    ap.add_argument("--workdir", default="/tmp/streamprune-memory-scaling")
    ap.add_argument("--tiny", action="store_true", help="shrunken shape (smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "memory_scaling.json"))
    ap.add_argument("--replan", action="store_true", help="only recompute the predictions of --results with planner.py")
    a = ap.parse_args(argv)
    if a.replan:
        res = replan(a.results, a.host_memory)
        print(table(res["rows"]))
        for r in res["rows"]:
            if "predicted_peak_host_bytes_first_run" in r:
                old = r["predicted_peak_host_bytes_first_run"]
                print(f"{r['blocks']} blocks: prediction before the planner.py fix {fmt_gb(old)} "
                      f"({100 * (old - r['peak_rss_bytes']) / r['peak_rss_bytes']:+.1f}%), now "
                      f"{fmt_gb(r['predicted_peak_host_bytes'])} ({r['error_pct']:+.1f}%)")
        return 0
    overrides = dict(TINY) if a.tiny else {}
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from synthetic import write_calibration

    calib = write_calibration(work / "calib.jsonl", a.nsamples, a.seqlen, a.vocab)
    import platform

    import torch

    rows = []
    for n in a.blocks:
        rows.append(measure(n, work, calib, a, overrides))
        print(table(rows), file=sys.stderr, flush=True)
    if not a.keep:
        calib.unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass
    by = {r["blocks"]: r for r in rows}
    lo, hi = min(by), max(by)
    ratio = by[hi]["peak_rss_bytes"] / by[lo]["peak_rss_bytes"]
    result = {
        "shape": {"config": a.config, "overrides": overrides, "vocab": a.vocab, "dtype": "bfloat16"},
        "settings": {"nsamples": a.nsamples, "seqlen": a.seqlen, "device": "cpu", "compute_dtype": "float32",
                     "activations": "cpu", "host_memory_for_plan": a.host_memory},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "rows": rows,
        "peak_rss_ratio": {"blocks": [hi, lo], "ratio": ratio},
    }
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"\npeak RSS {hi} blocks / {lo} blocks: {ratio:.3f}")
    for r in rows:
        if "phase_peaks" in r:
            print(f"\nRSS peaks by phase ({r['blocks']} blocks, diagnostic run, peak {fmt_gb(r['diagnostic_peak_rss_bytes'])}):")
            print(phase_table(r["phase_peaks"]))
    print(f"\nraw results: {a.results}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_phase_child":
        phase_child(sys.argv[2:])
    else:
        sys.exit(main())
