"""A model directory (or Hub id) and its config: what every command reads first. Imports nothing from the
package but the error type and the Hub resolution."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import StreamPruneError

DEFAULT_SEQLEN = 2048


def text_config(config):
    """The language model's part of a config (multimodal wrappers nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class ModelInfo:
    """A model directory (or hub id, see hub.resolve_model) and its config (text part for multimodal wrappers)."""
    path: Path
    config: object

    @classmethod
    def load(cls, path) -> "ModelInfo":
        from transformers import AutoConfig

        from .hub import resolve_model

        path = resolve_model(path)
        if not (path / "config.json").is_file():
            raise StreamPruneError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            json.loads((path / "config.json").read_text())
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (ValueError, KeyError, OSError) as e:
            raise StreamPruneError(f"{path}/config.json: cannot be read as a transformers config "
                                   f"({str(e).splitlines()[0]})") from None
        return cls(path, config)

    @property
    def text(self):
        return text_config(self.config)

    @property
    def context(self) -> int | None:
        return getattr(self.text, "max_position_embeddings", None)

    def seqlen(self, requested: int | None) -> int:
        """The default (min(2048, context)) or the requested length, refused beyond the context."""
        if requested is None:
            return min(DEFAULT_SEQLEN, self.context or DEFAULT_SEQLEN)
        if requested < 2:
            raise StreamPruneError("--seqlen must be at least 2")
        if self.context and requested > self.context:
            raise StreamPruneError(f"--seqlen {requested} is beyond the model's context ({self.context} tokens)")
        return requested
