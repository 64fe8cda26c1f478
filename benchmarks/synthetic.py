"""Synthetic Hugging Face checkpoints of any decoder shape, written one block at a time.

The model is never instantiated: the meta skeleton (streamprune.model.build_skeleton) gives every tensor's
name and shape, each block's tensors are generated (random weights scaled by 1/sqrt(in_features), norms = 1,
biases = 0), written as one safetensors shard with streamprune.writer.write_shard and dropped before the next
block is generated. Peak memory is about one block in the checkpoint dtype plus one generation chunk.

Layout: shard 1 holds the non-block tensors (embeddings, final norm, lm_head), shard k+2 holds block k;
`model.safetensors.index.json` carries `metadata.total_size` and the weight map.

    python benchmarks/synthetic.py OUT --config ../shared/data/configs/llama-2-70b.json --layers 4
    python benchmarks/synthetic.py OUT --shape 405b --layers 2
    python benchmarks/synthetic.py OUT --shape 70b --layers 2 --hidden 256 --intermediate 512 --heads 8 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing (the GPU machine)
    sys.path.insert(0, str(REPO))

from streamprune.model import build_skeleton, checkpoint_names, find_blocks  # noqa: E402
from streamprune.writer import shard_name, write_index, write_shard  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs"
SHAPES = {"70b": "llama-2-70b.json", "405b": "llama-3.1-405b.json", "llama-3.1-70b": "llama-3.1-70b.json",
          "qwen2.5-72b": "qwen2.5-72b.json"}
# the same configs, inline, for machines without ../shared (the lent GPU machine)
INLINE = {
    "llama-2-70b.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                         "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
                         "num_hidden_layers": 80, "vocab_size": 32000, "max_position_embeddings": 4096,
                         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
                         "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2},
    "llama-3.1-405b.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
                            "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
                            "num_hidden_layers": 126, "vocab_size": 128256, "max_position_embeddings": 131072,
                            "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
                            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                            "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
CHUNK_ELEMENTS = 1 << 25  # 32M elements (128 MB of float32) generated at a time


def load_config_dict(spec) -> dict:
    """A config dict from a dict, a path to config.json (or its directory), or a shape name (70b, 405b)."""
    if isinstance(spec, dict):
        return dict(spec)
    name = SHAPES.get(str(spec), None)
    if name is not None:
        path = CONFIGS / name
        return json.loads(path.read_text()) if path.is_file() else dict(INLINE[name])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fill(shape: tuple, name: str, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """One tensor: weights ~ N(0, 1/in_features), 1-D norms = 1, biases = 0; reproducible per (seed, name)."""
    out = torch.empty(shape, dtype=dtype)
    if len(shape) == 1:
        return out.zero_() if name.endswith(".bias") else out.fill_(1.0)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    flat = out.view(shape[0], -1)
    cols = flat.shape[1]
    scale = 1.0 / cols ** 0.5
    rows = max(1, CHUNK_ELEMENTS // cols)
    for r in range(0, flat.shape[0], rows):
        r1 = min(flat.shape[0], r + rows)
        chunk = torch.randn((r1 - r, cols), generator=gen, device=device, dtype=torch.float32)
        chunk.mul_(scale)
        flat[r:r1].copy_(chunk)
    return out


def release_tensors(config, name: str, shape: tuple) -> dict:
    """The tensors a published checkpoint stores for parameter `name`: one per expert where transformers'
    checkpoint conversion mapping merges them (MergeModulelist, then an optional Concatenate), else itself."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    for conv in get_checkpoint_conversion_mapping(config.model_type) or []:
        if not isinstance(conv, WeightConverter):
            continue
        target = conv._original_target_patterns[0].lstrip(".")
        if len(conv._original_target_patterns) != 1 or not name.endswith(target):
            continue
        prefix, sources = name[: len(name) - len(target)], conv._original_source_patterns
        dim = conv.operations[1].dim if len(conv.operations) == 2 else 1
        inner = list(shape[1:])
        inner[dim - 1] //= len(sources)
        return {prefix + src.lstrip(".").replace("*", str(e)): tuple(inner) for src in sources for e in range(shape[0])}
    return {name: shape}


def _fp8(t: torch.Tensor, block: tuple) -> tuple:
    """Block-scaled FP8 codes of a weight and their float32 scales (amax / 448 per tile)."""
    rows, cols = t.shape
    r, c = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(r * block[0], c * block[1])
    padded[:rows, :cols] = t
    scale = (padded.reshape(r, block[0], c, block[1]).abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    del padded
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (t.float() / full).to(torch.float8_e4m3fn), scale


def make_synthetic(out_dir, config_json_path_or_dict, num_layers: int, vocab_size: int = 1024,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0, overrides: dict | None = None,
                   device: str = "cpu", log=None, release: bool = False) -> dict:
    """Write a random-weight checkpoint of the config's architecture with `num_layers` blocks to `out_dir`.

    `overrides` replaces config entries (e.g. hidden_size for a shrunken test shape). `device` is where the
    random numbers are drawn (cuda is much faster for 405B-sized blocks); tensors are written from host memory.
    `release`: the layout a published checkpoint has, not the model's in-memory one: experts one tensor each
    (release_tensors) and, when the config declares block-scaled FP8, every 2-D projection weight in the blocks
    as FP8 codes with `weight_scale_inv` (routers, norms and embeddings stay in `dtype`), as DeepSeek-V3 ships.
    Returns {"dir", "bytes", "shards", "block_bytes", "seconds"}.
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config_dict(config_json_path_or_dict)
    cfg.update(overrides or {})
    cfg["num_hidden_layers"] = int(num_layers)
    cfg["vocab_size"] = int(vocab_size)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = _dtype_name(dtype)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep special ids inside the smaller vocab
        v = cfg.get(key)
        if isinstance(v, int) and v >= vocab_size:
            cfg[key] = vocab_size - 1
        elif isinstance(v, list):
            cfg[key] = [min(x, vocab_size - 1) for x in v]
    if "layer_types" in cfg and isinstance(cfg["layer_types"], list):  # Gemma-style per-layer lists follow the depth
        base = cfg["layer_types"]
        cfg["layer_types"] = [base[i % len(base)] for i in range(num_layers)]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out, local_files_only=True)
    skeleton = build_skeleton(config)
    blocks_name, blocks = find_blocks(skeleton, config)
    names = checkpoint_names(skeleton)
    shapes = {}
    for n in names:
        try:
            shapes[n] = tuple(skeleton.get_parameter(n).shape)
        except AttributeError:
            shapes[n] = tuple(skeleton.get_buffer(n).shape)
    fp8 = None
    if release:
        quant = cfg.get("quantization_config") or {}
        fp8 = tuple(quant["weight_block_size"]) if quant.get("quant_method") == "fp8" else None
        stored = {}
        for n in names:
            stored.update(release_tensors(config, n, shapes[n]))
        names, shapes = list(stored), stored
    prefix = blocks_name + "."
    groups = [[n for n in names if not n.startswith(prefix)]]
    for i in range(len(blocks)):
        groups.append([n for n in names if n.startswith(f"{prefix}{i}.")])
    total_shards = len(groups)
    weight_map, total, block_bytes = {}, 0, 0
    for k, group in enumerate(groups):
        t = time.perf_counter()
        tensors = {}
        for n in group:
            floating = True
            try:
                floating = skeleton.get_parameter(n).is_floating_point()
            except AttributeError:
                try:
                    floating = skeleton.get_buffer(n).is_floating_point()
                except AttributeError:  # a per-expert tensor of the release layout
                    pass
            value = _fill(shapes[n], n, dtype if floating else torch.float32, seed, device)
            if fp8 and n.startswith(prefix) and n.endswith("_proj.weight") and value.dim() == 2:
                tensors[n], tensors[n + "_scale_inv"] = _fp8(value, fp8)
            else:
                tensors[n] = value
            del value
        name = shard_name(k, total_shards)
        write_shard(out / name, tensors)
        size = sum(x.numel() * x.element_size() for x in tensors.values())
        if k == 1:
            block_bytes = size
        total += size
        weight_map.update({n: name for n in tensors})
        del tensors
        log(f"  {name}: {len(group)} tensors, {size / 1e9:.2f} GB, {time.perf_counter() - t:.1f}s")
    write_index(out, weight_map, total)
    return {"dir": str(out), "bytes": total, "shards": total_shards, "block_bytes": block_bytes,
            "seconds": time.perf_counter() - t0}


def write_calibration(path, nsamples: int, seqlen: int, vocab: int, seed: int = 0) -> Path:
    """A JSONL calibration file of random token windows ({"input_ids": [...]} per line)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (nsamples, seqlen), generator=g)
    path = Path(path)
    with open(path, "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config", help="config.json of the shape to copy (or its directory)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a stored shape: 70b (Llama-2-70B), 405b (Llama-3.1-405B), ...")
    ap.add_argument("--layers", type=int, required=True, help="number of decoder blocks")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where random numbers are drawn (cpu or cuda)")
    ap.add_argument("--hidden", type=int, help="override hidden_size")
    ap.add_argument("--intermediate", type=int, help="override intermediate_size")
    ap.add_argument("--heads", type=int, help="override num_attention_heads")
    ap.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    ap.add_argument("--max-position", type=int, help="override max_position_embeddings")
    ap.add_argument("--calib", help="also write a JSONL of random input_ids here")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    spec = a.config or a.shape or "70b"
    overrides = {k: v for k, v in (("hidden_size", a.hidden), ("intermediate_size", a.intermediate),
                                    ("num_attention_heads", a.heads), ("num_key_value_heads", a.kv_heads),
                                    ("max_position_embeddings", a.max_position)) if v is not None}
    if "hidden_size" in overrides or "num_attention_heads" in overrides:
        base = load_config_dict(spec)
        if "head_dim" in base:  # keep head_dim consistent with a changed hidden size
            overrides["head_dim"] = overrides.get("hidden_size", base["hidden_size"]) // \
                overrides.get("num_attention_heads", base["num_attention_heads"])
    log = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    r = make_synthetic(a.out, spec, a.layers, vocab_size=a.vocab, dtype=DTYPES[a.dtype], seed=a.seed,
                       overrides=overrides, device=a.device, log=log)
    if a.calib:
        write_calibration(a.calib, a.nsamples, a.seqlen, a.vocab, a.seed)
        r["calib"] = a.calib
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
