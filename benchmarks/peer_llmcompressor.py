"""Peer baseline: llm-compressor's Wanda oneshot on a Hugging Face checkpoint, the way a user would run it.

Run with the peer venv (bash benchmarks/peer_setup.sh), not the streamprune venv:

    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --model ~/.cache/streamprune/smollm2-135m \
        --calib windows.jsonl --out /tmp/llmc_out [--nsamples 16 --seqlen 256 --sparsity 0.5 --threads N]

The job mirrors `streamprune prune MODEL OUT --calib windows.jsonl --nsamples 16 --seqlen 256 --dtype float32
--device cpu`: the same pinned token windows (JSONL, one {"input_ids": [...]} per line; the first --nsamples
lines, truncated to --seqlen), float32 compute on CPU, Wanda 50% unstructured (mask_structure "0:0") on every
Linear inside the decoder layers (lm_head and the tied embedding untouched), batch size 1, the sequential
(layer-by-layer) pipeline with pruned outputs propagated to the next layer, and the result saved dense
(save_compressed=False) in the checkpoint's dtype (bf16) as an ordinary HF checkpoint.

llm-compressor logs (loguru) to stdout by default and that is left as a user would have it, so the JSON
result is the LAST line of stdout. It prints one JSON line at the end: seconds (perf_counter from the first statement of this file, before any other import), seconds_since_exec
(from the kernel's process start time, so it includes interpreter start-up), phase_seconds (import, load,
calibrate_prune, save), peak_rss_bytes (ru_maxrss), threads and versions.
"""

import time  # noqa: E402

T0 = time.perf_counter()  # whole-process timing starts here, before any other import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402


def seconds_since_exec() -> float | None:
    """Wall seconds since the kernel started this process (/proc/self/stat field 22 against /proc/uptime)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 overall; fields[0] here is field 3 (state)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--calib", required=True, help="JSONL with one {\"input_ids\": [...]} per line")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    a = ap.parse_args()

    phases = {}
    t = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    phases["import"] = time.perf_counter() - t

    if a.threads:
        torch.set_num_threads(a.threads)

    # Pinned calibration windows, already tokenized: no tokenizer is involved on this side.
    windows = []
    with open(a.calib) as f:
        for line in f:
            if line.strip():
                windows.append(json.loads(line)["input_ids"])
    if len(windows) < a.nsamples or any(len(w) < a.seqlen for w in windows[:a.nsamples]):
        raise SystemExit(f"{a.calib}: need {a.nsamples} windows of >= {a.seqlen} tokens")
    windows = [w[:a.seqlen] for w in windows[:a.nsamples]]
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * a.seqlen for _ in windows]})

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    phases["load"] = time.perf_counter() - t

    recipe = WandaPruningModifier(
        sparsity=a.sparsity,
        mask_structure="0:0",  # unstructured
        # Each decoder layer is a target; the prunable Linears inside it are pruned. (targets=["Linear"] with
        # ignore=["lm_head"] does NOT skip lm_head in 0.14: the ignore is matched against "lm_head.".)
        targets=[r"re:model\.layers\.\d+$"],
        ignore=["re:.*lm_head"],
    )
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=a.nsamples,
        max_seq_length=a.seqlen,
        batch_size=1,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        sequential_targets=["LlamaDecoderLayer"] if model.config.model_type == "llama" else None,
    )
    phases["calibrate_prune"] = time.perf_counter() - t

    t = time.perf_counter()
    model.to(_ckpt_dtype(a.model, torch))
    model.save_pretrained(a.out, save_compressed=False)
    AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)  # as oneshot(output_dir=...) saves its processor
    phases["save"] = time.perf_counter() - t

    import importlib.metadata as md
    versions = {}
    for name in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate",
                 "safetensors"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    print(json.dumps({
        "tool": "llmcompressor",
        "seconds": round(time.perf_counter() - T0, 3),
        "seconds_since_exec": None if (s := seconds_since_exec()) is None else round(s, 3),
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "nsamples": a.nsamples, "seqlen": a.seqlen, "sparsity": a.sparsity,
        "versions": versions,
    }))


def _ckpt_dtype(model_dir, torch):
    """The checkpoint's own dtype from its config.json (bf16 for SmolLM2), to save in."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name)


if __name__ == "__main__":
    main()
