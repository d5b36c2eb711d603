"""Files: refusing to overwrite an input, the checks every writer shares, content hashes."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
