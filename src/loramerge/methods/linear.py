"""Exact weighted sums on ΔW: linear, cat, svd.

None of these merges up and down factors separately (PEFT's ``linear`` and kohya's ratio merge
do, which adds cross terms and squares the weights): the sum Σ wᵢΔWᵢ is formed exactly by
concatenating the scaled factors, then re-factorised from those factors when asked.
"""

from __future__ import annotations

import torch

from .. import linalg
from .registry import ModuleContext, Term, register


def weighted_stack(terms: list[Term], ctx: ModuleContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B@A = Σ wᵢΔWᵢ exactly."""
    return linalg.stack([t.scaled_factors(ctx) for t in terms])


@register("cat", "Σ wᵢΔWᵢ exactly, factors concatenated (rank Σrᵢ)")
def cat(terms: list[Term], ctx: ModuleContext):
    return weighted_stack(terms, ctx)


@register("linear", "Σ wᵢΔWᵢ exactly, re-factorised to what the output dtype can hold (≤ Σrᵢ)")
def linear(terms: list[Term], ctx: ModuleContext):
    # float64 throughout and rounded once by the caller: the sum is then exact to the output
    # dtype's precision, and only a tail below a quarter of its ulp is cut. Exact zeros go too,
    # measured against the inputs (a LoRA plus itself keeps its own rank; a − a is zero, not
    # noise). One input goes through the SVD as well, so its factors come out balanced (√σ each
    # side) whatever scale split it arrived with.
    pairs = [t.scaled_factors(ctx, torch.float64) for t in terms]
    B, A = linalg.stack(pairs)
    svd = linalg.svd_of_product(B, A)
    zero_below = float(B.norm() * A.norm())  # ≥ every ‖τᵢ‖_F, and cheap
    k = min(linalg.rank_at_precision(svd.S, torch.finfo(ctx.out_dtype).eps),
            linalg.numerical_rank(svd.S, (B.shape[0], A.shape[1]), torch.float64, scale=zero_below))
    return svd.truncate(max(k, 1)).factors()


@register("svd", "Σ wᵢΔWᵢ truncated to --rank N (default: the largest input rank) or --energy F",
          uses_rank=True)
def svd(terms: list[Term], ctx: ModuleContext):
    B, A = weighted_stack(terms, ctx)
    decomposition = linalg.svd_of_product(B, A)
    k = truncation_rank(decomposition.S, ctx, default=max(t.module.rank for t in terms))
    kept = decomposition.truncate(k)
    total = float(decomposition.energy)
    ctx.stats["energy_kept"] = float(kept.energy) / total if total > 0 else 1.0
    return kept.factors()


def truncation_rank(S: torch.Tensor, ctx: ModuleContext, default: int) -> int:
    """--rank N, or the smallest rank keeping --energy F, capped by what exists (at least 1)."""
    if ctx.energy is not None:
        k = linalg.rank_for_energy(S, ctx.energy)
    else:
        k = ctx.rank if ctx.rank is not None else default
    return max(1, min(k, S.numel()))
