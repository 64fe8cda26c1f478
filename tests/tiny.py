"""Tiny random-weight checkpoints of several decoder-only families, written with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 4,
                                     "layer_types": ["sliding_attention", "full_attention"] * 2,
                                     "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                                     "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}


def make_config(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[family]
    kw = dict(COMMON, **extra)
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0, dtype=torch.float32, shard_size="40KB",
                    **overrides) -> Path:
    """Random weights (scaled so activations stay well-conditioned), saved as a sharded safetensors checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5) if "embed" not in name else p.normal_(0, 1.0)
    model.to(dtype).save_pretrained(path, max_shard_size=shard_size)
    return Path(path)


def write_ids(path: Path, n: int, seqlen: int, vocab: int = 256, seed: int = 0) -> Path:
    """A JSONL calibration file of pinned token windows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    return path
