"""Calibration windows: a [nsamples, seqlen] tensor of token ids, reproducible from (file, seed).

A plain text file (or JSONL with "text") is tokenized once as one stream and windows start at seeded random
positions. JSONL lines with "input_ids" are windows already: the first `nsamples` are used, in order,
each cut to `seqlen` (lines shorter than seqlen are an error). A dataset split (`--calib-dataset`, through the
optional `datasets` package) gives its rows in a seeded order, cut into consecutive windows (dataset_windows).
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
            raise StreamPruneError(_not_jsonl(path, raw, lineno)) from None
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


def _not_jsonl(path: Path, raw: str, lineno: int) -> str:
    """Why line `lineno` does not parse: a JSON document over several lines (a config.json, a JSON array) is not
    JSONL, whose every line is one record."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return f"--calib {path}:{lineno}: not valid JSON"
    what = {dict: "object", list: "array"}.get(type(doc), type(doc).__name__)
    return (f"--calib {path}: one JSON {what} over {len(raw.splitlines())} lines, not JSON Lines; calibration JSON "
            f"holds one record per line, {{\"text\": \"...\"}} or {{\"input_ids\": [...]}}, or give plain text")


def calibration_windows(path, tokenizer_dir: Path | None, nsamples: int, seqlen: int, seed: int,
                        vocab_size: int, dataset: str | None = None, column: str | None = None) -> torch.Tensor:
    """The [nsamples, seqlen] windows from the --calib file at `path`, or from `dataset` (--calib-dataset)."""
    flag = "--calib"
    if dataset is not None:
        ids, column = dataset_windows(dataset, column, tokenizer_dir, nsamples, seqlen, seed)
        flag, path = "--calib-dataset", f"{dataset} (column {column!r})"
    else:
        ids = file_windows(path, tokenizer_dir, nsamples, seqlen, seed)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise StreamPruneError(f"{flag} {path}: token id {int(ids[bad][0])} outside the vocabulary (size {vocab_size})")
    return ids


def file_windows(path, tokenizer_dir: Path | None, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    text, windows = read_calibration(path)
    if windows is not None:
        if len(windows) < nsamples:
            raise StreamPruneError(f"--calib {path}: {len(windows)} input_ids windows, --nsamples asks for {nsamples}")
        short = [i for i, w in enumerate(windows[:nsamples]) if len(w) < seqlen]
        if short:
            raise StreamPruneError(f"--calib {path}: window {short[0]} has {len(windows[short[0]])} tokens, --seqlen is {seqlen}")
        return torch.tensor([w[:seqlen] for w in windows[:nsamples]], dtype=torch.long)
    tokens = tokenize(text, tokenizer_dir)
    if len(tokens) < nsamples * seqlen:
        raise too_little(f"--calib {path}", len(tokens), nsamples, seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def too_little(source: str, tokens: int, nsamples: int, seqlen: int) -> StreamPruneError:
    """The refusal of a text shorter than nsamples x seqlen tokens, naming what it does fit."""
    fits = (f"it fits at most --nsamples {tokens // seqlen} at --seqlen {seqlen}" if tokens >= seqlen
            else f"it is shorter than one window of --seqlen {seqlen}")
    if tokens // nsamples >= 2:
        fits += f", or --seqlen {tokens // nsamples} with --nsamples {nsamples}"
    return StreamPruneError(f"{source}: {tokens} tokens, too little text for --nsamples {nsamples} x --seqlen {seqlen}"
                            f" = {nsamples * seqlen} tokens; {fits}; or give more text"
                            f" (docs/options.md: \"Calibration data\")")


def load_tokenizer(tokenizer_dir: Path | None, hint: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise StreamPruneError(f"{tokenizer_dir}: no usable tokenizer files{hint}") from None


def tokenize(text: str, tokenizer_dir: Path | None,
             hint: str = "; give --calib as JSONL with \"input_ids\"") -> torch.Tensor:
    """The whole text as one id stream, without special tokens."""
    tok = load_tokenizer(tokenizer_dir, hint)
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


# --- calibration from a dataset (the optional `datasets` package) ---------------------------------------------------

DATA_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                      ".arrow": "arrow"}
ROWS_PER_BATCH = 256


def parse_dataset(spec: str) -> tuple[str, str | None, str | None]:
    """`NAME`, `NAME:SPLIT` or `NAME:CONFIG:SPLIT` -> (name, config, split or None); NAME may be a local path
    (an existing path is taken whole, colons and all)."""
    if Path(spec).exists():
        return spec, None, None
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise StreamPruneError(f"--calib-dataset {spec!r}: give NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def canonical_dataset(spec: str) -> str:
    """The spec with a local path made absolute (what a resume runs with and the fingerprint records)."""
    name, config, split = parse_dataset(spec)
    if Path(name).exists():
        name = str(Path(name).resolve())
    return ":".join(p for p in (name, config, split) if p is not None)


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise StreamPruneError("--calib-dataset needs the datasets package: pip install 'streamprune[datasets]'") \
            from None
    return datasets


def load_calibration_dataset(spec: str):
    """One split of a dataset: a directory written by `save_to_disk`, a local data file or directory of data files,
    or a dataset name served from the local datasets cache (downloaded only where the cache lacks it and
    HF_DATASETS_OFFLINE / HF_HUB_OFFLINE allow it)."""
    datasets = import_datasets()
    name, config, split = parse_dataset(spec)
    flag = f"--calib-dataset {spec}"
    path = Path(name)
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            if config is not None:
                raise StreamPruneError(f"{flag}: a dataset saved with save_to_disk has no configs; give PATH or PATH:SPLIT")
            ds = _load(lambda: datasets.load_from_disk(str(path)), flag)
            if isinstance(ds, datasets.DatasetDict):
                split = split or "train"
                if split not in ds:
                    raise StreamPruneError(f"{flag}: no split {split!r} (it has {', '.join(ds)})")
                return ds[split]
            if split is not None and split != str(ds.split):
                raise StreamPruneError(f"{flag}: holds one dataset without split {split!r}; give the path alone")
            return ds
        split = split or "train"
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise StreamPruneError(f"{flag}: not a data file datasets reads ({', '.join(DATA_FILE_BUILDERS)})")
            return _load(lambda: datasets.load_dataset(builder, data_files={split: str(path)}, split=split), flag)
        if path.is_dir():
            return _load(lambda: datasets.load_dataset(str(path), config, split=split), flag)
        if name.startswith((".", "/", "~")):
            raise StreamPruneError(f"{flag}: no such file or directory")
        return _load_named(datasets, name, config, split, flag)
    finally:
        datasets.logging.set_verbosity(level)
        if quiet:
            datasets.enable_progress_bars()


def _load(fn, flag):
    try:
        return fn()
    except StreamPruneError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the first line says what went wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StreamPruneError(f"{flag}: cannot be loaded ({type(e).__name__}: {first})") from None


def _load_named(datasets, name, config, split, flag):
    """Cache first: the datasets library asks the hub before its cache unless offline, which without a network
    costs a long series of retries; so the cache is tried with offline mode forced, then the hub where allowed."""
    flags = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, k)]
    saved = {k: getattr(datasets.config, k) for k in flags}
    offline = any(saved.values())
    for k in flags:
        setattr(datasets.config, k, True)
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception:  # noqa: BLE001 - not in the cache (or not this config/split): the hub decides below
        pass
    finally:
        for k, v in saved.items():
            setattr(datasets.config, k, v)
    where = f"not a local path and not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE})"
    if offline:
        raise StreamPruneError(f"{flag}: {where}, and downloading is disabled (HF_DATASETS_OFFLINE or "
                               f"HF_HUB_OFFLINE)")
    from .hub import first_line, quiet_hub, unreachable

    why = unreachable(datasets.config.HF_ENDPOINT)
    if why:
        raise StreamPruneError(f"{flag}: {where}, and downloading failed ({why})")
    try:
        with quiet_hub():
            return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        raise StreamPruneError(f"{flag}: {where}, and downloading failed ({first_line(e)})") from None


def text_column(ds, column: str | None, flag: str) -> str:
    """The named column, else "text", else the only string column."""
    from datasets import Value

    strings = [k for k, f in ds.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    if column is not None:
        if column not in ds.features:
            raise StreamPruneError(f"{flag}: no column {column!r} (it has {', '.join(ds.features)})")
        if column not in strings:
            raise StreamPruneError(f"{flag}: column {column!r} is {ds.features[column]}, not text")
        return column
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise StreamPruneError(f"{flag}: no \"text\" column and {len(strings) or 'no'} other text columns "
                           f"({', '.join(f'{k}: {f}' for k, f in ds.features.items())}); name one with --calib-column")


def dataset_windows(spec: str, column: str | None, tokenizer_dir: Path | None, nsamples: int, seqlen: int,
                    seed: int) -> tuple[torch.Tensor, str]:
    """nsamples x seqlen tokens from a dataset split, and the text column used.

    The rows are taken in an order shuffled by `seed` (empty rows skipped), each tokenized on its own and joined by
    the tokens of a blank line; reading stops once nsamples x seqlen tokens are there, which are cut into
    consecutive windows. Every calibration token is then distinct and the cost follows what is needed, not the
    size of the split."""
    import pyarrow as pa

    flag = f"--calib-dataset {spec}"
    ds = load_calibration_dataset(spec)
    column = text_column(ds, column, flag)
    if ds._indices is not None:  # a selected/shuffled view: its rows in order, in memory (nothing written)
        ds = ds.flatten_indices(keep_in_memory=True)
    data = ds.data.column(column)
    tok = load_tokenizer(tokenizer_dir, f"; needed to tokenize {flag}")
    sep = tok("\n\n", add_special_tokens=False, verbose=False)["input_ids"]
    need, have, parts = nsamples * seqlen, 0, []
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    for j in range(0, len(order), ROWS_PER_BATCH):
        rows = [t for t in data.take(pa.array(order[j:j + ROWS_PER_BATCH].numpy())).to_pylist() if t and t.strip()]
        if not rows:
            continue
        for ids in tok(rows, add_special_tokens=False, verbose=False)["input_ids"]:
            part = (sep if parts else []) + ids
            parts.append(part)
            have += len(part)
        if have >= need:
            break
    if have < need:
        raise too_little(f"{flag} (column {column!r}, {len(ds)} rows)", have, nsamples, seqlen)
    stream = torch.tensor([t for part in parts for t in part][:need], dtype=torch.long)
    return stream.view(nsamples, seqlen), column
