"""DeepSeek-V3-shaped blocks pruned on the CPU with their experts streamed in groups: peak host memory against
the number of blocks, and against the plan the job made (blocks larger than the card; streamprune/groups.py).

For each count N: a synthetic checkpoint of DeepSeek-V3's real shapes in its release layout (benchmarks/
synthetic.py --release: MLA attention, a shared expert, 256 routed experts of 2048 x 7168, one FP8 tensor per
expert matrix with 128 x 128 block scales; one dense block first, then N MoE blocks of 11.5B parameters; vocab
1024) is pruned with Wanda 50% on the CPU in a subprocess, its RSS sampled from outside, and deleted. A block in
the CPU's float32 compute dtype would be 46 GB, on a machine of 24: only expert groups make it run. The
prediction is the plan the job itself made (`plan` in its --json summary, with the same group size), and the
standalone `streamprune plan` for the same checkpoint and host.

    python benchmarks/moe_memory.py                 # 1 and 2 MoE blocks (about 40 min here, up to 45 GB of disk)
    python benchmarks/moe_memory.py --tiny          # a 1-minute smoke test with a shrunken shape
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

from memory_scaling import run_json  # noqa: E402
from synthetic import make_synthetic, write_calibration  # noqa: E402

CONFIG = REPO / "tests" / "fixtures" / "configs" / "deepseek-v3.json"
GB = 1e9
TINY = {"hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 512, "n_routed_experts": 16,
        "q_lora_rank": 64, "kv_lora_rank": 32, "num_attention_heads": 4, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 16, "n_group": 4, "topk_group": 2}


def measure(n: int, work: Path, calib: Path, a) -> dict:
    ckpt, out = work / f"ckpt-{n}", work / f"out-{n}"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    overrides = dict(TINY if a.tiny else {}, first_k_dense_replace=1)
    try:
        t = time.perf_counter()
        made = make_synthetic(ckpt, json.loads(CONFIG.read_text()), 1 + n, vocab_size=a.vocab, overrides=overrides,
                              release=True, log=print)
        print(f"{n} MoE block(s): checkpoint {made['bytes'] / GB:.1f} GB in {time.perf_counter() - t:.0f} s")
        plan, _ = run_json([sys.executable, "-m", "streamprune", "plan", str(ckpt), "--json", "--nsamples",
                            str(a.nsamples), "--seqlen", str(a.seqlen), "--host-memory", a.host_memory])
        cmd = [sys.executable, "-m", "streamprune", "prune", str(ckpt), str(out), "--calib", str(calib),
               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", "cpu", "--json",
               "--no-progress", "--expert-group", str(a.group)]
        summary, extra = run_json(cmd, sample=True)
        p = summary["plan"]
        row = {"moe_blocks": n, "blocks": 1 + n, "checkpoint_bytes": made["bytes"], "seconds": round(extra["seconds"], 1),
               "peak_rss_bytes": summary["peak_rss_bytes"], "external_peak_rss_bytes": extra["external_peak_rss_bytes"],
               "planned_peak_host_bytes": p["peak_host_bytes"], "expert_group": summary["expert_group"],
               "overlap": p["overlap"], "sparsity": summary["sparsity"], "experts": summary["experts"],
               "experts_fallback": summary["experts_fallback"],
               "block_seconds": summary["block_seconds"],
               "standalone_plan": {"expert_group": plan["plan"]["expert_group"],
                                   "peak_host_bytes": plan["plan"]["peak_host_bytes"], "fits": plan["plan"]["fits"]},
               "cards_24GB": plan["cards"]["24GB"]}
        print(json.dumps({k: v for k, v in row.items() if k != "block_seconds"}))
        return row
    finally:
        if not a.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2], help="MoE block counts (after one dense block)")
    ap.add_argument("--group", type=int, default=32, help="--expert-group of the prune")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--host-memory", default="24GB", help="for the standalone plan")
    ap.add_argument("--workdir", default="/tmp/streamprune-moe-memory")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "moe_memory.json"))
    a = ap.parse_args(argv)
    if a.tiny:
        a.group = min(a.group, 5)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = write_calibration(work / "calib.jsonl", a.nsamples, a.seqlen, a.vocab)
    rows = [measure(n, work, calib, a) for n in a.blocks]
    base = rows[0]["peak_rss_bytes"]
    print("\n| MoE blocks | checkpoint | expert group | peak RSS | planned host peak | plan error | vs first | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = r["planned_peak_host_bytes"] / r["peak_rss_bytes"] - 1
        print(f"| {r['moe_blocks']} | {r['checkpoint_bytes'] / GB:.1f} GB | {r['expert_group']} of {r['experts'] // r['moe_blocks']}"
              f" | {r['peak_rss_bytes'] / GB:.2f} GB | {r['planned_peak_host_bytes'] / GB:.2f} GB | {err:+.1%} | "
              f"{r['peak_rss_bytes'] / base:.3f} | {r['seconds']:.0f} s |")
    if not a.tiny:
        Path(a.results).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(a), "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
