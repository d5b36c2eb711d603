"""Synthetic LoRAs with random factors on real module sets: for examples, tests and benchmarks."""

from __future__ import annotations

import math
import re

import torch

from .formats import keymaps
from .lora import LoRA, LoraModule

# The modules LoRA trainers target by default: attention, feed-forward and projection layers.
_ATTENTION_FF_PROJ = re.compile(
    r"(\.to_(q|k|v)|\.to_out\.0|\.ff\.net\.(0\.proj|2)|\.proj_(in|out)"
    r"|\.self_attn\.(q|k|v|out)_proj|\.mlp\.fc(1|2)"
    r"|\.add_(q|k|v)_proj|\.to_add_out|\.ff_context\.net\.(0\.proj|2)|\.proj_mlp)$"
)


def attention_targets(variant: str, components: tuple[str, ...] | None = None) -> dict[tuple[str, str], tuple[int, ...]]:
    """{(component, module name): weight shape} of the attention/ff/proj modules of a model."""
    return {
        (component, name): shape
        for component, modules in keymaps.table(variant).items()
        if components is None or component in components
        for name, shape in modules.items()
        if _is_target(name)
    }


def _is_target(name: str) -> bool:
    if not _ATTENTION_FF_PROJ.search("." + name):
        return False
    if name.endswith(("proj_in", "proj_out")):  # only the projections inside attention blocks
        return ".attentions." in name or name.startswith("single_transformer_blocks")
    return True


def random_lora(
    arch: str,
    targets: dict[tuple[str, str], tuple[int, ...]],
    rank: int,
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> LoRA:
    """A LoRA with Gaussian factors (down ~ N(0, 1/n), up ~ N(0, scale²/r)) on ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for (component, name), shape in sorted(targets.items()):
        n = math.prod(shape[1:])
        r = min(rank, shape[0], n)
        down = torch.randn(r, n, generator=gen) / n**0.5
        up = torch.randn(shape[0], r, generator=gen) * (scale / r**0.5)
        modules.append(LoraModule.from_factors(
            component, name, up.to(dtype), down.to(dtype), tuple(shape),
            alpha=float(r if alpha is None else alpha), dtype=dtype,
        ))
    return LoRA(modules, arch, "memory")
