"""The names an option may take, and the N:M structure's syntax: no torch here, so the CLI refuses a bad option in
a fraction of a second instead of after importing torch. The registries (methods/__init__.py) are built from the
same names (a test holds them equal)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StreamPruneError

METHODS = ("wanda", "magnitude", "ria", "sparsegpt", "admm")
REFINES = ("dsnot",)
PROFILES = ("uniform", "owl", "owl-linear")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # option value -> torch attribute
TIERS = ("auto", "gpu", "cpu", "disk")


@dataclass(frozen=True)
class Structure:
    """Unstructured (n = m = 0, `sparsity` applies), N:M (n of every m consecutive inputs zeroed), or width
    (whole MLP channels removed: width.py)."""
    n: int = 0
    m: int = 0
    width: bool = False

    @classmethod
    def parse(cls, text: str | None) -> "Structure":
        if text in (None, "", "unstructured"):
            return cls()
        if text == "width":
            return cls(width=True)
        try:
            n, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise StreamPruneError(f"--structure {text!r}: expected 'unstructured', 'width' or N:M such as 2:4") from None
        if not 0 < n < m:
            raise StreamPruneError(f"--structure {text}: N:M needs 0 < N < M (N weights zeroed in every M)")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "width" if self.width else "unstructured"
