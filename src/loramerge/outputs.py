"""Output paths: refusing to overwrite an input, and the checks every writer shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import OutputPathError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one existing file (so an input is never overwritten)."""
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is one of the inputs, in any spelling."""
    output = Path(output)
    for source in inputs:
        if Path(source).resolve() == output.resolve() or same_file(source, output):
            raise OutputPathError(f"output would overwrite the input {source}", output)
