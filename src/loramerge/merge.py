"""Merging LoRAs: align modules across inputs, check them, run a method per module, record
provenance in the result's header.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .basemodel import resolve_against_base
from .formats.checkpoint import Checkpoint
from .errors import ArchitectureMismatchError, ShapeMismatchError, UsageError
from .io import load_all
from .lora import LoRA, LoraModule
from . import linalg
from .blocks import parse_block_weights
from .methods import ModuleContext, Term, check_number, get_method
from .outputs import sha256_file

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
    dtype: torch.dtype | str | None = None,
    base=None,
    **params,
) -> LoRA:
    """Merge LoRAs on ΔW: result ΔW = method({wᵢ·ΔWᵢ}) per module.

    Bias deltas and norm-weight (1-D) deltas combine linearly, Σ wᵢ·Δbᵢ, whatever the method:
    the methods shape low-rank matrices, and a vector has nothing for them to trim or
    re-factorise. Modules whose change depends on the base weight (DoRA, IA3, OFT, BOFT,
    GLoRA) need ``base`` (a base checkpoint: single file or diffusers folder): each becomes its
    exact ΔW = W' − W there (:func:`loramerge.basemodel.resolve_against_base`); without it they
    are refused.

    ``weights`` default to 1. Modules present in only some inputs are merged from those
    inputs alone (so they keep their own weight). ``rank``/``energy`` apply to methods that
    re-factorise (``svd``…). ``block_weights`` is one spec for every input or a list with one
    per input (see :mod:`loramerge.blocks`); it multiplies each module's weight. ``dtype`` is
    the dtype the result will be written in (default: the inputs'); methods that keep the exact
    sum keep it to that precision. The result's header records the resolved recipe and each
    source's SHA-256.
    """
    inputs = load_all(loras)
    if not inputs:
        raise UsageError("nothing to merge: give at least one LoRA")
    if base is not None:
        inputs = resolve_against_base(inputs, base)
    for lora in inputs:
        for module in lora:
            if module.needs_base:
                raise module.base_error()
    weights = _check_weights(weights, len(inputs))
    the_method = get_method(method)
    if base is not None and any(p.name == "base" for p in the_method.params):
        # one --base serves both: learned methods train on it, base-dependent modules resolve on it
        params.setdefault("base", str(base.path if isinstance(base, Checkpoint) else base))
    resolved = the_method.resolve_params(params)
    _check_rank_options(the_method, rank, energy)
    _check_same_arch(inputs)
    device = resolve_device(device)
    source_date_epoch()  # a bad SOURCE_DATE_EPOCH is refused before the work, not after it
    per_input_blocks = [None if b is None else parse_block_weights(b, inputs[0].arch)
                        for b in _per_input(block_weights, len(inputs))]

    keys = sorted(set().union(*(lora.modules for lora in inputs)))
    out_dtype = _out_dtype(dtype, inputs)

    def module_terms(key: str):
        terms = [
            Term(lora[key], _block_weighted(w, bw, lora[key]), idx)
            for idx, (lora, w, bw) in enumerate(zip(inputs, weights, per_input_blocks))
            if key in lora
        ]
        shape = _check_shapes(terms, inputs)
        return terms, ModuleContext(key, shape, rank, energy, device, _module_seed(seed, key), dtype=compute_dtype,
                                    out_dtype=out_dtype)

    vectors = {k for k in keys if next(lora[k] for lora in inputs if k in lora).is_vector}
    # learned methods fit their coefficients on the base pipeline first (threads as torch has them)
    learned = the_method.learn(inputs, [module_terms(k) for k in keys if k not in vectors], resolved, seed=seed, progress=progress) \
        if the_method.learn is not None else None
    with linalg.single_threaded():  # same bytes whatever torch's thread count (see there)
        modules, stats = _run(the_method, resolved, keys, vectors, module_terms, out_dtype, compute_dtype, progress, learned)

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
    variants = {lora.variant for lora in inputs} - {None}
    result.variant = variants.pop() if len(variants) == 1 else None  # the one variant the inputs name
    return result


def _run(the_method, resolved: dict, keys: list[str], vectors: set[str], module_terms, out_dtype, compute_dtype,
         progress, learned=None):
    """The method over every module (after its prepare pass, or with what it learned):
    (merged modules, their stats). Vector deltas (norm weights) have no low-rank structure for a
    method to act on: they are always summed, Σ wᵢ·δᵢ."""
    shared = learned
    if shared is None and the_method.prepare:
        shared = the_method.prepare((module_terms(k) for k in keys if k not in vectors), resolved)
    modules, stats = [], {}
    for i, key in enumerate(keys):
        terms, ctx = module_terms(key)
        shape, ctx.shared = ctx.shape, shared
        if key in vectors:
            up = sum(t.weight * t.module.delta(torch.float64).reshape(-1, 1) for t in terms)
            first = terms[0].module
            modules.append(LoraModule.from_factors(first.component, first.name, up.to(compute_dtype),
                                                   torch.ones(1, 1, dtype=compute_dtype), shape, kind="norm",
                                                   dtype=out_dtype, bias=_merged_bias(terms)))
            if progress:
                progress(i + 1, len(keys), key)
            continue
        up, down = the_method.fn(terms, ctx, **resolved)
        if up.shape[1] == 0:  # nothing left (all tasks zero): one zero component, alpha/r stays defined
            up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
        # methods may hand back float64; one rounding here (powers of two only before it)
        up, down, scale = linalg.balance_for_storage(up, down)
        first = terms[0].module
        modules.append(LoraModule.from_factors(
            first.component, first.name, up.to(compute_dtype).cpu(), down.to(compute_dtype).cpu(), shape,
            alpha=up.shape[1] * scale, kind="lora", dtype=out_dtype, bias=_merged_bias(terms),
        ))
        if ctx.stats:
            stats[key] = dict(ctx.stats)
        if progress:
            progress(i + 1, len(keys), key)
    return modules, stats


def _check_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UsageError(f"weights must be numbers, got {list(weights)!r}") from None
    if len(weights) != n:
        raise UsageError(f"{n} LoRAs but {len(weights)} weights")
    for i, w in enumerate(weights):
        check_number(f"weight {i + 1}", w)
    return weights


def _block_weighted(weight: float, block_weights, module: LoraModule) -> float:
    """The input's weight times its block weight for ``module`` (checked: a block weight of
    nan or 1e300 must not reach the factors)."""
    if block_weights is None:
        return weight
    w = weight * block_weights.weight_for(module)
    check_number(f"weight × block weight of {module.key}", w)
    return w


def _check_rank_options(method, rank, energy) -> None:
    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both")
    if (rank is not None or energy is not None) and not method.uses_rank:
        raise UsageError(f"method {method.name!r} keeps the exact sum; --rank/--energy apply to svd-type methods")
    if rank is not None and not (isinstance(rank, numbers.Integral) and rank >= 1):  # nan < 1 is False
        raise UsageError(f"--rank must be a whole number of at least 1, got {rank!r}")
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
        compatible = m.is_vector == ref.is_vector and _flat(m.shape) == _flat(ref.shape) and (
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
    """Σ wᵢ·Δbᵢ over the inputs that carry a bias delta (linear for every method)."""
    biases = [(t.weight, t.module.bias_delta()) for t in terms if t.module.bias is not None]
    if not biases:
        return None
    return sum(w * b for w, b in biases)


def _common_dtype(inputs: list[LoRA]) -> torch.dtype:
    dtypes = {lora.dtype for lora in inputs}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _out_dtype(dtype, inputs: list[LoRA]) -> torch.dtype:
    from .formats.write import resolve_dtype

    return resolve_dtype(dtype) or _common_dtype(inputs)


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
