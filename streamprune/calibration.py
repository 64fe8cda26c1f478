"""Calibration windows: a [nsamples, seqlen] tensor of token ids, reproducible from (file, seed).

A plain text file (or JSONL with "text") is tokenized once as one stream and windows start at seeded random
positions. JSONL lines with "input_ids" are windows already: the first `nsamples` are used, in order,
each cut to `seqlen` (lines shorter than seqlen are an error).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import StreamPruneError


def read_text(path: Path, flag: str) -> str:
    """The file's text, or one clear error naming the option it came from."""
    if not path.is_file():
        raise StreamPruneError(f"{flag} {path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise StreamPruneError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    if not raw.strip():
        raise StreamPruneError(f"{flag} {path}: the file is empty")
    return raw


def read_calibration(path: str | Path) -> tuple[str | None, list[list[int]] | None]:
    """(text, None) for text input, (None, windows) for JSONL input_ids."""
    path = Path(path)
    raw = read_text(path, "--calib")
    if path.suffix not in (".jsonl", ".json"):
        return raw, None
    texts, windows = [], []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise StreamPruneError(f"--calib {path}:{lineno}: not valid JSON") from None
        if isinstance(rec, dict) and isinstance(rec.get("input_ids"), list):
            bad = [t for t in rec["input_ids"] if type(t) is not int or not 0 <= t < 2 ** 63][:1]
            if bad:  # JSON floats, strings, null, booleans and NaN are not token ids, nor is 2**63
                raise StreamPruneError(f"--calib {path}:{lineno}: \"input_ids\" must hold non-negative integers "
                                       f"(below 2**63), found {json.dumps(bad[0])}")
            windows.append(rec["input_ids"])
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        else:
            raise StreamPruneError(f"--calib {path}:{lineno}: each line needs \"text\" (string) or \"input_ids\" (list)")
    if texts and windows:
        raise StreamPruneError(f"--calib {path}: mixes \"text\" and \"input_ids\" lines; use one kind")
    return ("\n\n".join(texts), None) if texts else (None, windows)


def calibration_windows(path, tokenizer_dir: Path | None, nsamples: int, seqlen: int, seed: int,
                        vocab_size: int) -> torch.Tensor:
    text, windows = read_calibration(path)
    if windows is not None:
        if len(windows) < nsamples:
            raise StreamPruneError(f"--calib {path}: {len(windows)} input_ids windows, --nsamples asks for {nsamples}")
        short = [i for i, w in enumerate(windows[:nsamples]) if len(w) < seqlen]
        if short:
            raise StreamPruneError(f"--calib {path}: window {short[0]} has {len(windows[short[0]])} tokens, --seqlen is {seqlen}")
        ids = torch.tensor([w[:seqlen] for w in windows[:nsamples]], dtype=torch.long)
    else:
        tokens = tokenize(text, tokenizer_dir)
        need = nsamples * seqlen
        if len(tokens) < need:
            raise StreamPruneError(f"--calib {path}: {len(tokens)} tokens, too little text for --nsamples {nsamples} "
                                   f"x --seqlen {seqlen} = {need} tokens; give more text or lower them")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=gen)
        ids = torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise StreamPruneError(f"--calib {path}: token id {int(ids[bad][0])} outside the vocabulary (size {vocab_size})")
    return ids


def tokenize(text: str, tokenizer_dir: Path | None,
             hint: str = "; give --calib as JSONL with \"input_ids\"") -> torch.Tensor:
    """The whole text as one id stream, without special tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise StreamPruneError(f"{tokenizer_dir}: no usable tokenizer files{hint}") from None
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
