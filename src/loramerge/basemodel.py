"""Modules whose change depends on the base weight (DoRA, IA3, OFT, BOFT, GLoRA), made concrete
against a base checkpoint: ΔW = W' − W, exact, as dense factors read one module at a time.

``resolve_against_base`` is what ``merge --base BASE`` runs before merging (and what any other
code that needs fixed deltas can call); ``fuse`` and ``attach`` apply such modules directly.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

from .errors import LoraMergeError, ShapeMismatchError
from .formats import lycoris, transforms
from .formats.checkpoint import Checkpoint, Placement
from .lora import LoRA, LoraModule


def open_base(base: Checkpoint | str | os.PathLike) -> Checkpoint:
    """A base checkpoint: a single .safetensors file or a diffusers folder."""
    return base if isinstance(base, Checkpoint) else Checkpoint(base)


def place(ckpt: Checkpoint, module: LoraModule) -> Placement:
    """Where ``module``'s weight lives in the base; refuses a missing component or weight and a
    shape that differs."""
    placement = ckpt.placement(module.component, module.name)
    if placement is None:
        available = ckpt.components
        if module.component not in available:
            raise LoraMergeError(
                f"the base has no {module.component} (needed by module {module.key}); "
                f"it holds {', '.join(sorted(available)) or 'nothing usable'}", ckpt.path)
        raise LoraMergeError(f"the base has no weight for module {module.key}", ckpt.path)
    shape = ckpt.module_shape(placement)
    if not module.fits(shape):
        raise ShapeMismatchError(
            f"module {module.key} is {tuple(module.shape)} in the LoRA but {tuple(shape)} in the base", ckpt.path)
    return placement


def resolve_against_base(loras: Sequence[LoRA], base: Checkpoint | str | os.PathLike) -> list[LoRA]:
    """Each module of ``loras`` whose change depends on the base weight, replaced by its exact
    ΔW = W' − W given ``base`` (dense factors (I, ΔW) or (ΔW, I), rank min(m, n), read lazily);
    every other module unchanged. A weight w on such a module then means w·(W' − W)."""
    ckpt = open_base(base)  # opened (and its architecture checked) even when nothing needs it
    out = []
    for lora in loras:
        ckpt.check_arch(lora.arch, lora.path)
        if not any(m.needs_base for m in lora):
            out.append(lora)
            continue
        modules = [_resolved(m, ckpt) if m.needs_base else m for m in lora]
        copy = LoRA(modules, lora.arch, lora.format, lora.metadata, lora.path)
        copy.variant = lora.variant
        out.append(copy)
    return out


def _resolved(module: LoraModule, ckpt: Checkpoint) -> LoraModule:
    placement = place(ckpt, module)
    shape = module.shape if 0 not in module.shape else ckpt.module_shape(placement)

    def load():
        base = ckpt.module_weight(placement).reshape(shape)
        return lycoris.dense_factors(module.delta_given(base).reshape(shape[0], -1))

    rank = transforms.full_rank(shape)
    return replace(module, shape=tuple(shape), rank=rank, alpha=float(rank), load=load, kind="full", transform=None)
