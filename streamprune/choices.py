"""The vocabulary of options, below everything else: the declaration of one option (`Option`; options.py declares
the job's, each method its own), the dtype names an option may take, and the N:M structure's syntax. No torch
here, so the CLI refuses a bad option in a fraction of a second instead of after importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StreamPruneError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # option value -> torch attribute


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


PRUNE, PLAN, EVAL = "prune", "plan", "eval"


@dataclass(frozen=True)
class Option:
    name: str                      # the Python keyword; the CLI's is --name-with-dashes
    default: object
    help: str
    type: type = str               # str, int, float or bool
    output: bool = False           # changes the output bytes: part of the job's fingerprint
    group: str = "Job"             # where --help and docs/options.md list it
    commands: tuple = (PRUNE,)     # the CLI commands that take it (none: the Python API only)
    choices: tuple = ()            # the values it takes (listed in --help; checked in PruneOptions.check_values)
    default_text: str = ""         # a default decided at run time, said in words
    flag: str = ""                 # a bool whose CLI flag turns it off ("--no-overlap"); "" : --name[/--no-name]
    path: bool = False             # a file or directory on the CLI
    data: bool = False             # names the calibration data: the data's hash is fingerprinted, not the name
    param: str = ""                # a method's or profile's option: the keyword its constructor takes

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shown_default(self) -> str:
        """The default as --help and the docs say it."""
        if self.default_text:
            return self.default_text
        if self.type is bool:
            return "off" if self.flag or not self.default else "on"  # a flag: off unless given
        return "none" if self.default is None else str(self.default)
