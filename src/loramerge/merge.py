"""Merging LoRAs: align modules across inputs, check them, run a method per module, record
provenance in the result's header.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ArchitectureMismatchError, ShapeMismatchError, UsageError
from .io import load_all
from .lora import LoRA, LoraModule
from .outputs import sha256_file
from .blocks import parse_block_weights
from .methods import ModuleContext, Term, get_method

ProgressFn = Callable[[int, int, str], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked before any work: cpu, or cuda[:N] where CUDA is there."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {str(device)!r}; use cpu or cuda") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise UsageError(f"device {str(device)!r}: loramerge runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"device {str(device)!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def merge(
    loras: Sequence[LoRA | str | os.PathLike],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    block_weights=None,
    compute_dtype: torch.dtype = torch.float32,
    **params,
) -> LoRA:
    """Merge LoRAs on ΔW: result ΔW = method({wᵢ·ΔWᵢ}) per module.

    ``weights`` default to 1. Modules present in only some inputs are merged from those
    inputs alone (so they keep their own weight). ``rank``/``energy`` apply to methods that
    re-factorise (``svd``…). ``block_weights`` is one spec for every input or a list with one
    per input (see :mod:`loramerge.blocks`); it multiplies each module's weight. The result's
    header records the resolved recipe and each source's SHA-256.
    """
    inputs = load_all(loras)
    if not inputs:
        raise UsageError("nothing to merge: give at least one LoRA")
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise UsageError(f"{len(inputs)} LoRAs but {len(weights)} weights")
    the_method = get_method(method)
    resolved = the_method.resolve_params(params)
    _check_rank_options(the_method, rank, energy)
    _check_same_arch(inputs)
    device = resolve_device(device)
    source_date_epoch()  # a bad SOURCE_DATE_EPOCH is refused before the work, not after it
    per_input_blocks = [None if b is None else parse_block_weights(b, inputs[0].arch)
                        for b in _per_input(block_weights, len(inputs))]

    keys = sorted(set().union(*(lora.modules for lora in inputs)))
    out_dtype = _common_dtype(inputs)

    def module_terms(key: str):
        terms = [
            Term(lora[key], w * (bw.weight_for(lora[key]) if bw else 1.0), idx)
            for idx, (lora, w, bw) in enumerate(zip(inputs, weights, per_input_blocks))
            if key in lora
        ]
        shape = _check_shapes(terms, inputs)
        return terms, ModuleContext(key, shape, rank, energy, device, _module_seed(seed, key), dtype=compute_dtype)

    shared = the_method.prepare((module_terms(k) for k in keys), resolved) if the_method.prepare else None
    modules, stats = [], {}
    for i, key in enumerate(keys):
        terms, ctx = module_terms(key)
        shape, ctx.shared = ctx.shape, shared
        up, down = the_method.fn(terms, ctx, **resolved)
        first = terms[0].module
        modules.append(LoraModule.from_factors(
            first.component, first.name, up.cpu(), down.cpu(), shape,
            kind="lora", dtype=out_dtype, bias=_merged_bias(terms),
        ))
        if ctx.stats:
            stats[key] = dict(ctx.stats)
        if progress:
            progress(i + 1, len(keys), key)

    recipe = {
        "method": method,
        "params": resolved,
        "rank": rank,
        "energy": energy,
        "seed": seed,
        "arch": inputs[0].arch,
        "sources": [_source_entry(lora, w, bw) for lora, w, bw in zip(inputs, weights, per_input_blocks)],
    }
    result = LoRA(modules, inputs[0].arch, "merged", provenance(inputs, recipe))
    result.stats = stats
    return result


def _check_rank_options(method, rank, energy) -> None:
    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both")
    if (rank is not None or energy is not None) and not method.uses_rank:
        raise UsageError(f"method {method.name!r} keeps the exact sum; --rank/--energy apply to svd-type methods")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must lie in (0, 1], got {energy}")


def _name(lora: LoRA) -> str:
    return str(lora.path) if lora.path else repr(lora)


def _check_same_arch(inputs: list[LoRA]) -> None:
    first = inputs[0]
    for other in inputs[1:]:
        if other.arch != first.arch:
            raise ArchitectureMismatchError(
                f"is a {other.arch} LoRA but {_name(first)} is {first.arch}; "
                "LoRAs of different architectures cannot be merged",
                other.path,
            )


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _check_shapes(terms: list[Term], inputs: list[LoRA]) -> tuple[int, ...]:
    """The common target shape; a 1×1 conv and a Linear of the same size are compatible."""
    ref = terms[0].module
    for t in terms[1:]:
        m = t.module
        compatible = _flat(m.shape) == _flat(ref.shape) and (
            m.shape == ref.shape or (m.shape[2:] in ((), (1, 1)) and ref.shape[2:] in ((), (1, 1)))
        )
        if not compatible:
            raise ShapeMismatchError(
                f"module {m.key} has shape {tuple(m.shape)} here but {tuple(ref.shape)} in "
                f"{_name(inputs[terms[0].index])}",
                inputs[t.index].path,
            )
    return ref.shape


def _merged_bias(terms: list[Term]) -> torch.Tensor | None:
    biases = [(t.weight, t.module.bias_delta()) for t in terms if t.module.bias is not None]
    if not biases:
        return None
    return sum(w * b for w, b in biases)


def _common_dtype(inputs: list[LoRA]) -> torch.dtype:
    dtypes = {lora.dtype for lora in inputs}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _module_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# provenance


def _per_input(spec, n: int) -> list:
    """One block-weight spec per input: a list with one entry per input, or one spec for all
    (a list of numbers is one A1111 vector, not one spec per input)."""
    if spec is None:
        return [None] * n
    if isinstance(spec, (list, tuple)) and len(spec) == n and not all(isinstance(x, (int, float)) for x in spec):
        return list(spec)
    return [spec] * n


def _source_entry(lora: LoRA, weight: float, block_weights=None) -> dict:
    """A source as the recipe schema writes it: its path (absolute here; made relative to the
    output when saved), its SHA-256, weight, and the block weights resolved (equivalent specs —
    a vector, its preset, a dict — record the same thing, and a recipe re-reads it)."""
    entry: dict = {"weight": weight}
    if block_weights is not None:
        entry["block_weights"] = block_weights.describe()
    if lora.path is not None:
        entry["path"] = str(lora.path.resolve())
        if lora.path.is_file():
            entry["sha256"] = sha256_file(lora.path)
    return entry


def _title(lora: LoRA) -> str:
    return lora.metadata.get("modelspec.title") or (lora.path.stem if lora.path else "in-memory LoRA")


def provenance(inputs: list[LoRA], recipe: dict) -> dict[str, str]:
    """Header fields naming what a merge was made from and how."""
    return {
        "modelspec.title": " + ".join(_title(lora) for lora in inputs),
        "modelspec.merged_from": ", ".join(_title(lora) for lora in inputs),
        "modelspec.date": merge_date(inputs),
        "loramerge.recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":")),
    }


_LAST_EPOCH = 253402300799  # 9999-12-31T23:59:59Z


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH (seconds since 1970, UTC) if set; anything but such an integer is refused."""
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if not text:
        return None
    try:
        epoch = int(text.strip())
    except ValueError:
        epoch = -1
    if not 0 <= epoch <= _LAST_EPOCH:
        raise UsageError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970 (0 to {_LAST_EPOCH}), got {text!r}")
    return epoch


def merge_date(inputs: list[LoRA]) -> str:
    """A date that depends on the inputs only, so a rerun writes identical bytes.

    SOURCE_DATE_EPOCH if set (the reproducible-builds convention); else the newest date the
    inputs' own headers give; else the newest input file's modification time (UTC).
    """
    epoch = source_date_epoch()
    if epoch is not None:
        return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    dates = [lora.metadata.get("modelspec.date") for lora in inputs if lora.metadata.get("modelspec.date")]
    if dates:
        return max(dates)
    mtimes = [Path(lora.path).stat().st_mtime for lora in inputs if lora.path and Path(lora.path).exists()]
    when = max(mtimes) if mtimes else 0
    return _dt.datetime.fromtimestamp(int(when), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
