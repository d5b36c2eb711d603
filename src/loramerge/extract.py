"""Extracting a LoRA from the difference of two checkpoints (a fine-tune and its base).

Per Linear/Conv weight both checkpoints hold: Δ = W_tuned − W_base in float32, factorised by
randomized SVD to ``rank`` (or the smallest rank keeping ``energy`` of ‖Δ‖²), with the
relative error ‖Δ − Δ_k‖/‖Δ‖ recorded per module. Fused tensors (OpenCLIP in_proj, Flux qkv)
give one module per member. Tensors are read one at a time.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import linalg
from .errors import ArchitectureMismatchError, LoraMergeError, UsageError
from .formats.checkpoint import Checkpoint, Placement, to_module_layout
from .lora import LoRA, LoraModule


@dataclass
class ExtractReport:
    modules: int = 0
    skipped_unchanged: int = 0
    errors: dict[str, float] = field(default_factory=dict)  # module key → relative error


def _slice(tensor: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The part of a stored tensor that is one module's weight, in the module's layout."""
    if placement.rows:
        tensor = tensor[placement.rows[0]:placement.rows[1]]
    return to_module_layout(tensor, placement)


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    threshold: float = 0.0,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[LoRA, ExtractReport]:
    """A LoRA whose ΔW approximates tuned − base, module by module."""
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank or --energy")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must lie in (0, 1], got {energy}")
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    if base_ckpt.arch != tuned_ckpt.arch:
        raise ArchitectureMismatchError(f"the tuned model is {tuned_ckpt.arch} but the base is {base_ckpt.arch}", tuned)
    base_modules = {(c, n): p for c, n, p in base_ckpt.modules()}
    pairs = [(key, base_modules[key], p) for *key_parts, p in tuned_ckpt.modules()
             if (key := (key_parts[0], key_parts[1])) in base_modules]
    if not pairs:
        raise LoraMergeError("the two checkpoints share no Linear/Conv weight", tuned)
    # read each stored tensor once, even when several modules live in it
    by_tensor = collections.defaultdict(list)
    for key, bp, tp in pairs:
        by_tensor[(bp.file, bp.key, tp.file, tp.key)].append((key, bp, tp))
    modules, report, done = [], ExtractReport(), 0
    for (bfile, bkey, tfile, tkey), group in by_tensor.items():
        w_base = base_ckpt.files[bfile].read(bkey)
        w_tuned = tuned_ckpt.files[tfile].read(tkey)
        if w_base.shape != w_tuned.shape:
            raise LoraMergeError(f"tensor {tkey} is {tuple(w_tuned.shape)} but {tuple(w_base.shape)} in the base", tuned)
        for (component, name), bp, tp in group:
            a, b = _slice(w_base, bp), _slice(w_tuned, tp)
            delta = b.to(torch.float32) - a.to(torch.float32)
            module = _factorise(component, name, delta, rank, energy, oversample, power_iters, seed, threshold, report)
            if module is not None:
                modules.append(module)
            done += 1
            if progress:
                progress(done, len(pairs), f"{component}.{name}")
    if not modules:
        raise LoraMergeError("the tuned model does not differ from the base in any Linear/Conv weight", tuned)
    lora = LoRA(modules, base_ckpt.arch, "extracted", {
        "modelspec.title": f"extracted from {os.path.basename(str(tuned))}",
        "loramerge.extracted": f"base={os.path.basename(str(base))} tuned={os.path.basename(str(tuned))} "
                               + (f"rank={rank}" if rank is not None else f"energy={energy}"),
    })
    lora.stats = {k: {"extract_error": v} for k, v in report.errors.items()}
    return lora, report


def _factorise(component, name, delta, rank, energy, oversample, power_iters, seed, threshold, report):
    shape = tuple(delta.shape)
    flat = delta.reshape(shape[0], -1)
    norm = float(flat.norm())
    if norm == 0.0 or norm <= threshold:
        report.skipped_unchanged += 1
        return None
    digest = hashlib.sha256(f"{seed}:{component}.{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    full = min(flat.shape)
    if energy is not None:
        svd = linalg.randomized_svd_for_energy(flat, energy, min(32, full), oversample, power_iters, generator)
    else:
        svd = linalg.randomized_svd(flat, min(rank, full), oversample, power_iters, generator)
    up, down = svd.factors()
    error = float((flat - up @ down).norm()) / norm
    key = f"{component}.{name}"
    report.errors[key] = error
    report.modules += 1
    return LoraModule.from_factors(component, name, up, down, shape, dtype=torch.float32)
