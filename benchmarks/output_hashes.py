"""Per-tensor sha256 of streamprune's outputs over a fixed grid of models and options.

Used to prove that a refactor changes no output tensor: record the hashes before, then compare after.

    python benchmarks/output_hashes.py --record benchmarks/results/output_hashes_before.json
    python benchmarks/output_hashes.py --compare benchmarks/results/output_hashes_before.json

The grid: tiny random checkpoints of six families (tests/tiny.py, deterministic) with Wanda unstructured and
2:4, every method and refinement on Llama (ADMM included), OWL, MLP width, a bf16 checkpoint, bf16 compute, batch
3, disk activations, two ranks (`--nproc 2` through the CLI); an FP8 twin (Wanda, SparseGPT); a tiny Qwen3-MoE
(per-expert and fused, whole blocks and experts in groups); the streamed evaluation's perplexities of a tiny
model and of a pruned one; and the real SmolLM2-135M (the demo build) with Wanda, 2:4, SparseGPT, ADMM, RIA+DSnoT,
OWL, magnitude and width. Calibration ids are random (seeded), so nothing outside the repository is needed. Hashes are of tensor bytes (dtype + shape + data),
not of files, so a writer that lays out headers differently still compares equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def tensor_hashes(out: Path) -> dict:
    from safetensors import safe_open

    result = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                result[name] = h.hexdigest()
    return result


def cases():
    tiny = []
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"):
        tiny.append((fam, {}, {}))
        tiny.append((fam, {}, {"structure": "2:4"}))
    for opts in ({"method": "magnitude", "sparsity": 0.6, "calib": None}, {"method": "ria"},
                 {"method": "sparsegpt"}, {"method": "sparsegpt", "structure": "2:4"},
                 {"method": "wanda", "refine": "dsnot"}, {"method": "ria", "refine": "dsnot", "structure": "4:8"},
                 {"sparsity_profile": "owl", "sparsity": 0.6}, {"batch_size": 3}, {"dtype": "bfloat16"},
                 {"activations": "disk", "snapshot_every": 1, "overlap": False}, {"method": "admm"},
                 {"method": "admm", "structure": "2:4"}, {"structure": "width", "sparsity": 0.5, "width_multiple": 8},
                 {"structure": "width", "sparsity": 0.3, "width_multiple": 8, "width_compensation": False},
                 {"nproc": 2}, {"nproc": 2, "method": "sparsegpt"}):
        tiny.append(("llama", {}, opts))
    tiny.append(("llama", {"dtype": torch.bfloat16}, {}))
    tiny.append(("gemma3", {}, {"method": "sparsegpt", "sparsity_profile": "owl", "sparsity": 0.7, "owl_lambda": 0.1}))
    smol = [{}, {"structure": "2:4"}, {"method": "sparsegpt"}, {"method": "ria", "refine": "dsnot"},
            {"sparsity_profile": "owl", "sparsity": 0.7}, {"method": "magnitude", "calib": None},
            {"method": "admm"}, {"structure": "width", "sparsity": 0.2}]
    return tiny, smol


def key(family, model_kw, opts) -> str:
    parts = [family] + [f"model.{k}={v}" for k, v in sorted(model_kw.items())] + [f"{k}={v}" for k, v in sorted(opts.items())]
    return ",".join(str(p).replace("torch.", "") for p in parts)


def prune_cli(model, out, opts) -> None:
    """`streamprune prune` in a child process (the path `--nproc` takes: torchrun ranks)."""
    import os
    import subprocess

    args = [sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--overwrite", "--no-progress"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)


def extra_cases(tmp: Path, ids: Path, results: dict) -> None:
    """FP8, Mixture-of-Experts (whole and in groups) and the streamed evaluation's perplexities."""
    import streamprune
    from test_moe import make_moe
    from tiny import make_checkpoint, quantize_fp8

    fp8 = quantize_fp8(make_checkpoint(tmp / "bf16", "llama", dtype=torch.bfloat16, realistic=False), tmp / "fp8")
    for opts in ({}, {"method": "sparsegpt"}):
        k = key("llama-fp8", {}, opts)
        streamprune.prune(fp8, tmp / "out", overwrite=True, calib=str(ids), nsamples=8, seqlen=32, progress=False,
                          **opts)
        results[k] = tensor_hashes(tmp / "out")
        print(f"{k}: {len(results[k])} tensors", flush=True)
    for fused in (False, True):
        moe = make_moe(tmp / f"moe{int(fused)}", "qwen3_moe", fused=fused)
        for opts in ({}, {"expert_group": 3}, {"method": "sparsegpt", "expert_group": 2}):
            k = key("qwen3_moe", {"fused": fused}, opts)
            streamprune.prune(moe, tmp / "out", overwrite=True, calib=str(ids), nsamples=8, seqlen=32,
                              progress=False, expert_min_tokens=1, **opts)
            results[k] = tensor_hashes(tmp / "out")
            print(f"{k}: {len(results[k])} tensors", flush=True)
    ids_eval = torch.randint(0, 256, (4 * 32,), generator=torch.Generator().manual_seed(1))
    dense = make_checkpoint(tmp / "eval-dense", "llama")
    streamprune.prune(dense, tmp / "eval-pruned", calib=str(ids), nsamples=8, seqlen=32, progress=False)
    moe = tmp / "moe0"
    for name, model, kw in (("llama", dense, {}), ("llama-pruned", tmp / "eval-pruned", {}),
                            ("llama-batch2", dense, {"batch_size": 2}), ("qwen3_moe", moe, {}),
                            ("qwen3_moe-groups", moe, {"expert_group": 3})):
        r = streamprune.evaluate(model, ids=ids_eval, seqlen=32, progress=False, **kw)
        results[f"eval:{name}"] = {"ppl": r["ppl"].hex(), "nll": r["nll"].hex()}
        print(f"eval:{name}: ppl {r['ppl']}", flush=True)


def run_grid(skip_smollm2: bool = False) -> dict:
    import streamprune
    from tiny import make_checkpoint, write_ids

    results = {}
    tiny, smol = cases()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = write_ids(tmp / "ids.jsonl", 8, 32)
        models = {}
        for fam, model_kw, opts in tiny:
            k = key(fam, model_kw, opts)
            mk = (fam, tuple(sorted(model_kw.items())))
            if mk not in models:
                models[mk] = make_checkpoint(tmp / f"m{len(models)}", fam, **model_kw)
            kw = dict(calib=str(ids), nsamples=8, seqlen=32, progress=False)
            kw.update(opts)
            out = tmp / "out"
            if "nproc" in kw:
                kw = {k: v for k, v in kw.items() if k != "progress"}
                prune_cli(models[mk], out, kw)
            else:
                streamprune.prune(models[mk], out, overwrite=True, **kw)
            results[k] = tensor_hashes(out)
            print(f"{k}: {len(results[k])} tensors", flush=True)
        extra_cases(tmp, ids, results)
        if not skip_smollm2:
            from streamprune.demo import build_smollm2

            smol_dir = build_smollm2()
            g = torch.Generator().manual_seed(0)
            sids = torch.randint(0, 49152, (4, 64), generator=g)
            calib = tmp / "smol.jsonl"
            calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in sids.tolist()))
            for opts in smol:
                k = key("smollm2", {}, opts)
                kw = dict(calib=str(calib), nsamples=4, seqlen=64, progress=False)
                kw.update(opts)
                out = tmp / "out"
                streamprune.prune(smol_dir, out, overwrite=True, **kw)
                results[k] = tensor_hashes(out)
                print(f"{k}: {len(results[k])} tensors", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--skip-smollm2", action="store_true")
    a = ap.parse_args()
    got = run_grid(a.skip_smollm2)
    if a.record:
        a.record.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} cases, {sum(len(v) for v in got.values())} tensors -> {a.record}")
    if a.compare:
        want = json.loads(a.compare.read_text())
        bad = 0
        for case, tensors in sorted(got.items()):
            if case not in want:
                print(f"{case}: not in the recorded file")
                continue
            diff = sorted(n for n in set(tensors) | set(want[case]) if tensors.get(n) != want[case].get(n))
            bad += bool(diff)
            print(f"{case}: {'identical' if not diff else f'{len(diff)} tensors differ, e.g. {diff[:3]}'}")
        print(f"{len(got) - bad} of {len(got)} cases identical ({sum(len(v) for v in got.values())} tensors)")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
