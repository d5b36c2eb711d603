"""Where an entry-wise merge rule runs: on the dense delta ("full") or in Core Space ("core").

A rule (:class:`Rule`) merges the task matrices τᵢ of one module entry by entry, after an
optional whole-matrix statistic per task (a magnitude threshold) and optional uniform draws
per entry (DARE, DELLA).

- full: τᵢ = wᵢ·ΔWᵢ, dense m×n, one module at a time and, inside it, a block of rows at a
  time (recomputed from the factors, so no T×m×n stack exists and the work stays in cache).
  The merged matrix is re-factorised to the target rank by randomized SVD (oversampling,
  power iterations); the relative error ‖M − M_k‖_F/‖M‖_F is recorded per module.
- core (Core Space merging, Panariello et al., NeurIPS 2025): with B = [B₁ … B_T] (m×R) and
  A = [A₁; …; A_T] (R×n), U_B holds B's left singular vectors and V_A A's right singular
  vectors (both from thin QR + an R×R SVD); each task becomes Mᵢ = U_Bᵀ·τᵢ·V_Aᵀ =
  (U_Bᵀ Bᵢ)(Aᵢ V_Aᵀ), R×R, never m×n. The rule merges the Mᵢ; the result maps back as
  U_B·M·V_A. The projection is exact for every task (τᵢ = U_B Mᵢ V_A), so a linear rule
  loses nothing. All of it runs in float64 (it is small) and is rounded once.
  Canonical factorisation: the bases depend on the factors, not only on their product, so
  each task first becomes its own thin SVD, Bᵢ = Uᵢ·√σᵢ and Aᵢ = √σᵢ·Vᵢᵀ (weight and
  alpha/r included, exact zeros dropped). Then BBᵀ = Σ Uᵢσᵢ Uᵢᵀ = Σ (τᵢτᵢᵀ)^½ and the
  result is a function of the ΔWᵢ alone: the same for (c·up, down/c), (up·G, G⁻¹·down) or
  extra zero components. A task's own signs do not matter (a sign, or a rotation within a
  repeated singular value, of Uᵢ changes neither Uᵢσᵢ Uᵢᵀ, all the bases see, nor τᵢ, all the
  cores see); the bases' signs do, because rules that break an even vote towards + (TIES by
  frequency) are not sign-equivariant, so each column of U_B and row of V_A has its
  largest-magnitude entry positive. (The Core Space code folds the scale into Bᵢ and keeps
  each file's own split.)
Random draws are per task, from a generator seeded by the module and the task's input index,
in row-major order: the same numbers whatever the chunking.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import linalg
from .registry import ModuleContext, Param, Term

SPACE_PARAMS = (
    Param("space", str, "core", "core: merge in Core Space (exact bases, R×R); full: on the dense delta",
          choices=("core", "full")),
    Param("oversample", int, 10, "randomized SVD oversampling (full space)", low=0, high=500),
    Param("power_iters", int, 2, "randomized SVD power iterations (full space; 1 to 3 is typical)", low=0, high=100),
)
_CHUNK_ELEMENTS = 1 << 16  # per task: rows × n kept near this, to stay in cache


@dataclass(frozen=True)
class Rule:
    """apply(τ block T×rows×q, per-task stats, uniform draws T×rows×q or None) → rows×q."""

    apply: Callable[[torch.Tensor, list, torch.Tensor | None], torch.Tensor]
    task_stats: Callable[[torch.Tensor], Any] | None = None  # |τᵢ| flattened → stats for task i
    random: bool = False


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest of a 1-D tensor (+inf for k = 0), by linear-time selection."""
    n = values.numel()
    if k <= 0:
        return float("inf")
    if k >= n:
        return float(values.min())
    array = values.detach().cpu().numpy()
    array.partition(n - k)  # in place: callers pass a temporary (|τ|)
    return float(array[n - k])


def task_seed(module_seed: int, index: int) -> int:
    """The seed of task ``index``'s draws in one module."""
    return (module_seed * 1_000_003 + index) % (1 << 63)


def core_bases(terms: list[Term], ctx: ModuleContext) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U_B m×R', V_A R''×n, [Mᵢ]) with Mᵢ = U_Bᵀ·wᵢΔWᵢ·V_Aᵀ, from the canonical factors, in
    float64. With the given factors stacked, B = Q_B·R_B and Aᵀ = Q_A·R_A, every task is
    τᵢ = Q_B·Xᵢ·Q_Aᵀ with Xᵢ = R_B[:, i]·R_A[:, i]ᵀ (R×R), and Xᵢ's SVD Pᵢ·Sᵢ·Zᵢᵀ is τᵢ's own
    (Uᵢ = Q_B·Pᵢ): the canonical factors, their bases and the cores all live in these R×R
    coordinates, and only the two QRs and the final products touch m or n."""
    pairs = [t.scaled_factors(ctx, torch.float64) for t in terms]
    B, A = linalg.stack(pairs)
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    starts = [0, *itertools.accumulate(up.shape[1] for up, _ in pairs)]
    X = [R_B[:, i:j] @ R_A[:, i:j].T for i, j in zip(starts, starts[1:])]
    shape = (B.shape[0], A.shape[1])
    canonical = [_canonical(x, shape) for x in X]  # (Pᵢ√Sᵢ, √SᵢZᵢᵀ) per task, in coordinates
    U = _left_singular_basis(torch.cat([c for c, _ in canonical], dim=1), shape)
    V = _left_singular_basis(torch.cat([d for _, d in canonical], dim=0).T, shape)
    U_B, V_A = Q_B @ U, Q_A @ V  # m×R', n×R''
    su, sv = linalg.column_signs(U_B), linalg.column_signs(V_A)
    U, V = U * su, V * sv
    return U_B * su, (V_A * sv).T.contiguous(), [U.T @ x @ V for x in X]


def _canonical(x: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's thin SVD as balanced factors (P·√S, √S·Zᵀ), exact zeros dropped."""
    P, S, Zh = torch.linalg.svd(x, full_matrices=False)
    k = linalg.numerical_rank(S, shape, torch.float64)
    root = S[:k].sqrt()
    return P[:, :k] * root, root[:, None] * Zh[:k]


def _left_singular_basis(X: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Left singular vectors of the small X for its nonzero singular values. Zero is measured
    at float64's precision: a small task's directions are genuine, and dropping them loses it."""
    P, S, _ = torch.linalg.svd(X, full_matrices=False)
    return P[:, :linalg.numerical_rank(S, shape, torch.float64) or 1]


def _flush_noise(cores: torch.Tensor) -> torch.Tensor:
    """Set entries the projection left at rounding level to exactly zero: an entry-wise rule
    must not count ±1e-17 as a task taking part (TIES would halve an entry only one task has).
    Rounding is relative to each task's own size, so the floor is per task; one floor for all
    would erase a small task's genuine entries."""
    size = cores.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    floor = size * max(cores.shape[1:]) * torch.finfo(cores.dtype).eps
    return torch.where(cores.abs() > floor, cores, torch.zeros_like(cores))


def merge_in_space(terms: list[Term], ctx: ModuleContext, rule: Rule, space: str,
                   oversample: int = 10, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    if space == "core":
        return _core(terms, ctx, rule)
    return _full(terms, ctx, rule, oversample, power_iters)


def default_rank(terms: list[Term]) -> int:
    """Without --rank: the rank of the exact sum's factors, Σrᵢ."""
    return sum(t.module.rank for t in terms)


def _generators(terms: list[Term], ctx: ModuleContext) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(task_seed(ctx.seed, t.index)) for t in terms]


def _draws(generators, shape, dtype):
    return torch.stack([torch.rand(shape, generator=g, dtype=dtype) for g in generators])


def uniform_draws(terms: list[Term], ctx: ModuleContext, shape) -> torch.Tensor:
    """T×shape uniform draws, each task from its own seeded generator, in the compute dtype (the
    numbers of the seed rule), as float64 for rules that run in float64."""
    return _draws(_generators(terms, ctx), shape, ctx.dtype).double()


def _core(terms, ctx, rule):
    U_B, V_A, cores = core_bases(terms, ctx)
    tau = _flush_noise(torch.stack(cores))
    stats = [rule.task_stats(t.abs().reshape(-1)) for t in tau] if rule.task_stats else [None] * len(terms)
    draws = uniform_draws(terms, ctx, tau.shape[1:]) if rule.random else None
    merged = rule.apply(tau, stats, draws)
    if ctx.rank is None and ctx.energy is None:  # keep the core result exactly: rank ≤ R
        return U_B @ merged, V_A
    P, S, Qh = torch.linalg.svd(merged, full_matrices=False)
    svd = linalg.LowRankSVD(P, S, Qh)
    k = linalg.rank_for_energy(svd.S, ctx.energy) if ctx.energy is not None else min(ctx.rank, S.numel())
    kept = svd.truncate(max(k, 1))
    ctx.stats["energy_kept"] = float(kept.energy / svd.energy) if float(svd.energy) > 0 else 1.0
    up, down = kept.factors()
    return U_B @ up, down @ V_A


def _full(terms, ctx, rule, oversample, power_iters):
    # One module's task deltas, dense (T×m×n: the largest SDXL module with two tasks is
    # ~100 MB); the entry-wise rule then runs a block of rows at a time, in cache.
    pairs = [t.folded_factors(ctx) for t in terms]
    tau = torch.empty(len(pairs), pairs[0][0].shape[0], pairs[0][1].shape[1], dtype=ctx.dtype)
    for i, (up, down) in enumerate(pairs):
        torch.mm(up, down, out=tau[i])
    stats = [rule.task_stats(t.abs().reshape(-1)) for t in tau] if rule.task_stats else [None] * len(terms)
    generators = _generators(terms, ctx) if rule.random else None
    m, n = tau.shape[1:]
    merged = torch.empty(m, n, dtype=ctx.dtype)
    total_sq = 0.0
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, m, rows):
        block = tau[:, start:start + rows]
        draws = _draws(generators, block.shape[1:], block.dtype) if rule.random else None
        out = merged[start:start + rows]
        out.copy_(rule.apply(block, stats, draws))
        flat = out.reshape(-1)
        total_sq += float(torch.dot(flat, flat))
    del tau
    return refactorise(merged, ctx, ctx.rank if ctx.rank is not None else default_rank(terms),
                       oversample, power_iters, total_sq)


def refactorise(merged: torch.Tensor, ctx: ModuleContext, k: int, oversample: int, power_iters: int,
                total_sq: float | None = None):
    """Randomized SVD of a dense merged delta to rank k (or --energy); records the error."""
    if total_sq is None:
        flat = merged.reshape(-1)
        total_sq = float(torch.dot(flat, flat))
    if total_sq == 0.0:
        ctx.stats["refactor_error"] = 0.0
        return torch.zeros(merged.shape[0], 1, dtype=merged.dtype), torch.zeros(1, merged.shape[1], dtype=merged.dtype)
    generator = torch.Generator().manual_seed(ctx.seed ^ 0x5EED)
    if ctx.energy is not None:
        svd = linalg.randomized_svd_for_energy(merged, ctx.energy, k, oversample, power_iters, generator, total_sq)
    else:
        svd = linalg.randomized_svd(merged, k, oversample, power_iters, generator)
    # U·S·Vh is the best rank-k approximation within the sketch's range, so
    # ‖M − U S Vh‖² = ‖M‖² − Σσ²: no second pass over the dense matrix — unless the error is
    # so small that the subtraction loses it to rounding; then measure it directly.
    residual = max(total_sq - float((svd.S.double() ** 2).sum()), 0.0)
    if residual < 1e-6 * total_sq:
        up, down = svd.factors()
        residual = float(((merged - up @ down).double() ** 2).sum())
    ctx.stats["refactor_error"] = (residual / total_sq) ** 0.5
    return svd.factors()
