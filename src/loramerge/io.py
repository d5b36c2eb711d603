"""Reading and writing LoRA files: the two calls the rest of the package and users share."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

from .errors import AmbiguousArchitectureError, LoraMergeWarning
from .formats import archs, read_lora, save_lora
from .formats.write import dtype_name, resolve_dtype, resolve_format
from .lora import LoRA
from .provenance import RECIPE_KEY, describe_embedded


def load(path: str | os.PathLike, arch: str | None = None) -> LoRA:
    """Read a LoRA file (kohya, LyCORIS, diffusers/PEFT, ComfyUI, ai-toolkit…) or PEFT folder."""
    return read_lora(path, arch=arch)


def load_all(sources: Sequence[LoRA | str | os.PathLike], arch: str | None = None,
             prefer: str | None = None) -> list[LoRA]:
    """Read several LoRAs meant to be used together. A file that fits several architectures
    equally is read as the architecture its context has (``prefer``: the base model's or the
    pipeline's), else the one architecture all the other files agree on, when there is one."""
    loaded: dict[int, LoRA] = {}
    ambiguous: dict[int, AmbiguousArchitectureError] = {}
    for i, source in enumerate(sources):
        if isinstance(source, LoRA):
            loaded[i] = source
            continue
        try:
            loaded[i] = load(source, arch)
        except AmbiguousArchitectureError as exc:
            ambiguous[i] = exc
    if ambiguous:
        settled = {prefer} if prefer else {lora.arch for lora in loaded.values()}
        for i, exc in ambiguous.items():
            agreed = settled & set(exc.candidates)
            if len(agreed) != 1:
                raise exc
            loaded[i] = load(sources[i], agreed.pop())
    return [loaded[i] for i in range(len(sources))]


def save(lora: LoRA, path: str | os.PathLike, format: str | None = None, dtype=None,
         metadata: dict[str, str] | None = None) -> str:
    """Write ``lora`` atomically in ``format`` (default: the one every client loads for its
    architecture); returns the format written. A merge result's recipe gets its output section
    (format, dtype, title), so the file says everything needed to make it again."""
    metadata = dict(metadata or {})
    recipe = describe_embedded(lora.metadata, lora.path)
    if recipe is not None and "invalid" in recipe:
        warnings.warn(f"{lora.path}: {recipe['invalid']}; the field is not carried over", LoraMergeWarning,
                      stacklevel=2)
        metadata[RECIPE_KEY] = None
    elif recipe is not None:
        arch = archs.spec(lora.arch)
        recipe["output"] = {
            "format": resolve_format(arch, format),
            "dtype": dtype_name(resolve_dtype(dtype) or lora.dtype),
            "title": metadata.get("modelspec.title"),
        }
        for entry in recipe["sources"]:  # where the sources lie, seen from the output
            if isinstance(entry, dict) and entry.get("path") and os.path.isabs(entry["path"]):
                entry["path"] = Path(os.path.relpath(entry["path"], Path(path).resolve().parent)).as_posix()
        metadata[RECIPE_KEY] = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    from .clients import write_warning

    return save_lora(lora, path, format=format, dtype=dtype, metadata=metadata, warn=write_warning)
