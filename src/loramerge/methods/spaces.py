"""Where an entry-wise merge rule runs: on the dense delta ("full") or in Core Space ("core").

A rule maps the stacked task matrices τ (T × p × q) of one module to one merged p × q matrix.

- full: τᵢ = wᵢ·ΔWᵢ, dense m×n, one module at a time; the merged matrix is re-factorised to
  the target rank by randomized SVD (oversampling, power iterations) and the relative
  re-factorisation error ‖M − M_k‖/‖M‖ is recorded per module.
- core (Core Space merging, Panariello et al., NeurIPS 2025): with B = [B₁ … B_T] (m×R) and
  A = [A₁; …; A_T] (R×n), U_B spans B's columns and V_A spans A's rows (orthonormal, from the
  SVDs of the stacked factors); every task is projected to Mᵢ = U_Bᵀ ΔWᵢ V_Aᵀ =
  (U_Bᵀ Bᵢ)(Aᵢ V_Aᵀ), an R×R matrix, never m×n. The rule merges the Mᵢ and the result maps
  back as U_B·M·V_A. The projection is exact for every task (ΔWᵢ = U_B Mᵢ V_A), so a linear
  rule loses nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import linalg
from . import ModuleContext, Param, Term

Rule = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

SPACE_PARAMS = (
    Param("space", str, "core", "core: merge in Core Space (exact bases, R×R); full: on the dense delta",
          choices=("core", "full")),
    Param("oversample", int, 10, "randomized SVD oversampling (full space)", low=0),
    Param("power_iters", int, 2, "randomized SVD power iterations (full space)", low=0),
)


def core_bases(terms: list[Term], ctx: ModuleContext) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U_B m×R', V_A R''×n, [Mᵢ]) with Mᵢ = U_Bᵀ·wᵢΔWᵢ·V_Aᵀ, computed from the factors."""
    # wᵢ·sᵢ goes into Bᵢ (as the Core Space code does): how a scale is split between the
    # factors changes the bases, and so what an entry-wise rule sees.
    pairs = [t.folded_factors(ctx) for t in terms]
    B, A = linalg.stack(pairs)
    U_B = _left_singular_basis(B)
    V_A = _left_singular_basis(A.T).T
    cores = [(U_B.T @ up) @ (down @ V_A.T) for up, down in pairs]
    return U_B, V_A, cores


def _left_singular_basis(X: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of X (p×R) for its nonzero singular values: thin QR, then the SVD
    of the small R×R triangle (X = Q·R = (Q·P)·Σ·Zᵀ)."""
    Q, R = torch.linalg.qr(X)
    P, S, _ = torch.linalg.svd(R.double(), full_matrices=False)
    keep = int(linalg.numerical_rank(S, tuple(X.shape))) or 1
    return Q @ P[:, :keep].to(X.dtype)


def _flush_noise(cores: torch.Tensor) -> torch.Tensor:
    """Set entries the projection left at rounding level to exactly zero: an entry-wise rule
    must not count ±1e-17 as a task taking part (TIES would halve an entry only one task has)."""
    floor = float(cores.abs().max()) * max(cores.shape[1:]) * torch.finfo(cores.dtype).eps
    return torch.where(cores.abs() > floor, cores, torch.zeros_like(cores))


def merge_in_space(terms: list[Term], ctx: ModuleContext, rule: Rule, space: str,
                   oversample: int = 10, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(ctx.seed)
    if space == "core":
        return _core(terms, ctx, rule, generator)
    return _full(terms, ctx, rule, generator, oversample, power_iters)


def default_rank(terms: list[Term]) -> int:
    """Without --rank: the rank of the exact sum's factors, Σrᵢ."""
    return sum(t.module.rank for t in terms)


def _core(terms, ctx, rule, generator):
    U_B, V_A, cores = core_bases(terms, ctx)
    merged = rule(_flush_noise(torch.stack(cores)), generator)
    R = merged.shape[0]
    k = _target_rank(ctx, default=min(merged.shape))
    if ctx.rank is None and ctx.energy is None:  # keep the core result exactly: rank ≤ R
        return U_B @ merged, V_A
    P, S, Qh = torch.linalg.svd(merged.double(), full_matrices=False)
    svd = linalg.LowRankSVD(P.to(merged.dtype), S.to(merged.dtype), Qh.to(merged.dtype))
    k = _energy_rank(svd.S, ctx) if ctx.energy is not None else min(k, R)
    kept = svd.truncate(max(k, 1))
    ctx.stats["energy_kept"] = float(kept.energy / svd.energy) if float(svd.energy) > 0 else 1.0
    up, down = kept.factors()
    return U_B @ up, down @ V_A


def _full(terms, ctx, rule, generator, oversample, power_iters):
    taus = torch.stack([up @ down for up, down in (t.folded_factors(ctx) for t in terms)])
    merged = rule(taus, generator)
    total = float(merged.norm())
    if total == 0.0:
        ctx.stats["refactor_error"] = 0.0
        return torch.zeros(merged.shape[0], 1), torch.zeros(1, merged.shape[1])
    k = _target_rank(ctx, default=default_rank(terms))
    sketch_gen = torch.Generator().manual_seed(ctx.seed ^ 0x5EED)
    if ctx.energy is not None:
        svd = _energy_sketch(merged, ctx.energy, k, oversample, power_iters, sketch_gen)
    else:
        svd = linalg.randomized_svd(merged, k, oversample, power_iters, sketch_gen)
    up, down = svd.factors()
    ctx.stats["refactor_error"] = float((merged - up @ down).norm()) / total
    return up, down


def _target_rank(ctx: ModuleContext, default: int) -> int:
    return ctx.rank if ctx.rank is not None else default


def _energy_rank(S: torch.Tensor, ctx: ModuleContext) -> int:
    return linalg.rank_for_energy(S, ctx.energy)


def _energy_sketch(M, energy, k, oversample, power_iters, generator):
    """Randomized SVD wide enough that its top singular values hold ``energy`` of ‖M‖_F²."""
    total = float((M.double() ** 2).sum())
    width = max(k, 1)
    while True:
        svd = linalg.randomized_svd(M, width, oversample, power_iters, generator)
        kept = torch.cumsum(svd.S.double() ** 2, 0) / total
        hit = (kept >= energy - 1e-12).nonzero()
        if hit.numel() or width >= min(M.shape):
            return svd.truncate(int(hit[0]) + 1 if hit.numel() else svd.S.numel())
        width = min(2 * width, min(M.shape))
