"""Where a MODEL argument's files are: a local directory, or a Hugging Face Hub id served from the local cache
first (offline-safe) and downloaded only where the cache lacks it and HF_HUB_OFFLINE allows; a GGUF file is
named for what it is.

The hub client retries a failed connection for half a minute, printing each retry; where the hub's host cannot
even be reached, that is said at once instead.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from .errors import StreamPruneError

# what a prune reads from a model repository: config, generation config, tokenizer, safetensors weights and index
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the hub's host cannot be reached (name resolution or TCP connect), or None when it can."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}: {e.strerror or e}"
    return None


@contextmanager
def quiet_hub():
    """The hub client's warnings (its retries) off: the one line on failure says what happened."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_refusal(path: Path) -> StreamPruneError:
    return StreamPruneError(
        f"{path}: a GGUF file, not a safetensors checkpoint directory; convert it first (pip install gguf), e.g. "
        f"AutoModelForCausalLM.from_pretrained({str(path.parent)!r}, gguf_file={path.name!r}, "
        f"dtype=torch.bfloat16).save_pretrained(DIR) and the same with AutoTokenizer, then prune DIR")


def looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.endswith("/"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(model) -> Path:
    """The local directory holding MODEL's files. A local path is taken as it is (a missing config.json or shard
    is refused later, by what reads it); a GGUF file or any other file is refused here; a name that is no local
    path but a valid hub id is looked up in the Hugging Face cache, then downloaded where allowed."""
    path = Path(model)
    if path.is_dir():
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
        if ggufs and not (path / "config.json").exists():
            raise gguf_refusal(ggufs[0])
        return path
    if path.is_file():
        if is_gguf(path):
            raise gguf_refusal(path)
        raise StreamPruneError(f"{path}: a file, not a model directory (a directory with config.json and "
                               f"safetensors shards)")
    if not looks_like_repo_id(str(model)):
        raise StreamPruneError(f"{path}: no such model directory")
    return hub_snapshot(str(model))


def missing_files(snapshot: Path) -> str | None:
    """What a cached snapshot lacks of a safetensors checkpoint (a config or weights fetched alone leave such
    snapshots behind), or None."""
    import json

    from .shards import INDEX_NAME, SINGLE_NAME

    if not (snapshot / "config.json").is_file():
        return "config.json"
    if (snapshot / INDEX_NAME).is_file():
        try:
            shards = sorted(set(json.loads((snapshot / INDEX_NAME).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return None  # the checkpoint reader names what is wrong with the index
        gone = [s for s in shards if not (snapshot / s).is_file()]
        return f"{gone[0]}" + (f" and {len(gone) - 1} more shards" if len(gone) > 1 else "") if gone else None
    return None if (snapshot / SINGLE_NAME).is_file() else f"{SINGLE_NAME} or {INDEX_NAME}"


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a model repository's files, downloaded (MODEL_FILES only) when not cached."""
    from huggingface_hub import constants, snapshot_download

    with quiet_hub():
        try:
            snapshot = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=MODEL_FILES))
        except Exception:  # noqa: BLE001 - not cached (the hub client's errors differ by version): try the hub below
            snapshot, lacking = None, None
        else:
            lacking = missing_files(snapshot)
            if lacking is None:
                return snapshot
        where = (f"{repo_id}: neither a local directory nor in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
                 if snapshot is None else f"{repo_id}: its snapshot in the local Hugging Face cache ({snapshot}) "
                 f"lacks {lacking}")
        if constants.HF_HUB_OFFLINE:
            raise StreamPruneError(f"{where}, and downloading is disabled (HF_HUB_OFFLINE)")
        why = unreachable(constants.ENDPOINT)
        if why:
            raise StreamPruneError(f"{where}, and downloading failed ({why})")
        try:
            return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
        except Exception as e:  # noqa: BLE001
            raise StreamPruneError(f"{where}, and downloading failed ({first_line(e)})") from None
