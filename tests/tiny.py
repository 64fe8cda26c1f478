"""Tiny checkpoints of several decoder-only families, written with save_pretrained, and real text for tests.

`make_checkpoint(..., realistic=True)` (what the test fixtures use) gives models whose numbers behave like a real
model's: hidden size 80 and head dim 20 (square roots that no float format holds exactly, unlike 64's 8), and
60 training steps on sequences that repeat with period 2 (the loss falls from 5.6 to about 4: the model has
learnt to look two positions back), so attention depends on position and a wrong rotary table, mask or scale
changes the outputs. The plain random models (realistic=False) stay available: the
output-hash benchmark was recorded on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
REALISTIC = dict(hidden_size=80, intermediate_size=160)
TRAIN_STEPS = 60

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


# families built on demand only (not in the suite's every-family parametrizations)
MORE_FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", {}),  # output head `embed_out` in its checkpoints, `lm_head` in the model
    "mamba": ("MambaConfig", {}),  # a depthwise Conv1d in every block (3-D kernels that are not experts)
}


def make_config(family: str, realistic: bool = False, **overrides):
    import transformers

    cls_name, extra = {**FAMILIES, **MORE_FAMILIES}[family]
    kw = dict(COMMON, **(REALISTIC if realistic else {}), **extra)
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def _train(model, steps: int, seed: int) -> None:
    """A few Adam steps of next-token prediction on period-2 sequences: position now matters."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 2), generator=g).repeat(1, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0, dtype=torch.float32, shard_size="40KB",
                    realistic: bool = False, float32_norms: bool = False, **overrides) -> Path:
    """A sharded safetensors checkpoint: random weights scaled so activations stay well-conditioned, trained a
    few steps when `realistic`; saved in `dtype` (with 1-D tensors kept in float32 if `float32_norms`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(family, realistic, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # tied embeddings are the output head too: smaller, or the logits of a trained model blow up
    embed_std = 0.1 if realistic and cfg.get_text_config().tie_word_embeddings else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5) if "embed" not in name else p.normal_(0, embed_std)
    if realistic:
        _train(model, TRAIN_STEPS, seed)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    model.to(dtype)
    if float32_norms:  # the trained float32 values, most of which bf16 cannot hold
        for n, p in model.named_parameters():
            if n in norms:
                p.data = norms[n]
    model.save_pretrained(path, max_shard_size=shard_size)
    return Path(path)


def write_ids(path: Path, n: int, seqlen: int, vocab: int = 256, seed: int = 0) -> Path:
    """A JSONL calibration file of pinned token windows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    return write_windows(path, ids)


def write_windows(path: Path, ids: torch.Tensor) -> Path:
    Path(path).write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    return Path(path)


def tensors(d: Path) -> dict:
    """Every tensor of the safetensors files in directory `d`, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def ids_of(path: Path) -> torch.Tensor:
    """The windows of a JSONL calibration file of input_ids."""
    return torch.tensor([json.loads(line)["input_ids"] for line in open(path)])


def real_text() -> str:
    """About 460 kB of English prose that every Python installation carries (the interpreter's help topics)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def _shards(dst: Path):
    """(shard names, the index or None) of a checkpoint folder: sharded with an index, or one model.safetensors."""
    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    return ["model.safetensors"], None


def _full_scale(scale: torch.Tensor, block, shape) -> torch.Tensor:
    rows, cols = shape[-2:]
    return scale.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def quantize_fp8(src: Path, dst: Path, block=(32, 32)) -> Path:
    """A block-scaled FP8 twin of a checkpoint, as DeepSeek-V3 and the Qwen3 FP8 releases store theirs: every
    2-D weight inside the decoder blocks as float8_e4m3fn codes plus a float32 `weight_scale_inv` per tile
    (amax / 448), everything else as it was, and `quantization_config` in config.json. Fused 3-D experts
    tensors (`mlp.experts.gate_up_proj`) get one grid of tiles per expert (`gate_up_proj_scale_inv`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic",
                                  "fmt": "e4m3"}
    (dst / "config.json").write_text(json.dumps(cfg))
    shards, index = _shards(dst)
    for shard in shards:
        tensors = load_file(dst / shard)
        out = {}
        for name, t in tensors.items():
            if ".layers." in name and ((name.endswith(".weight") and t.dim() == 2) or t.dim() == 3):
                *lead, rows, cols = t.shape
                r, c = -(-rows // block[0]), -(-cols // block[1])
                padded = torch.zeros(*lead, r * block[0], c * block[1])
                padded[..., :rows, :cols] = t.float()
                tiles = padded.reshape(*lead, r, block[0], c, block[1]).abs().amax(dim=(-3, -1))
                scale = (tiles / 448.0).clamp_min(1e-12)
                out[name] = (t.float() / _full_scale(scale, block, t.shape)).to(torch.float8_e4m3fn)
                out[name + "_scale_inv"] = scale.float()
                if index:
                    index["weight_map"][name + "_scale_inv"] = shard
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
    if index:
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def dequantized_twin(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint's weights as float32 (codes x scale), without quantization_config."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    (dst / "config.json").write_text(json.dumps(cfg))
    shards, index = _shards(dst)
    for shard in shards:
        tensors = load_file(dst / shard)
        out = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                if index:
                    index["weight_map"].pop(name)
                continue
            if t.dtype == torch.float8_e4m3fn:
                t = t.float() * _full_scale(tensors[name + "_scale_inv"], block, t.shape)
            out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
    if index:
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def byte_tokenizer(model_dir):
    """A real byte-level BPE tokenizer without merges: one token per UTF-8 byte, ids below 256 (the tiny
    models' vocabulary), so a text's token count is its byte count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)
    return model_dir
