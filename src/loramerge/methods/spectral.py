"""Alignment and spectral merges, all computed from the LoRA factors (never an m×n delta).

Task deltas are τᵢ = wᵢ·ΔWᵢ; everything here runs in float64 (it is small: QRs of m×R and
n×R, SVDs of R×R) and the result is rounded once.

- knots (Stoica et al., ICLR 2025): SVD of the concatenation [τ₁ … τ_T] = U·Σ·[V₁ᵀ … V_Tᵀ];
  the Σ-scaled right blocks Σ·Vᵢᵀ are merged (TIES by default, top-k mask per layer or global
  over all layers as in the paper), ΔW = λ·U·merged. Factored: with B = [B₁ … B_T] = Q·R_B,
  the concatenation is Q·(R_B·blockdiag(A₁ … A_T)), and only the R×(T·n) core is decomposed.
- tsv (Task Singular Vectors, Gargiulo et al., CVPR 2025): each task's top ⌊k/T⌋ singular
  triplets (k = --rank, default Σrᵢ; never past a task's numerical rank), stacked; the stacked
  bases are replaced by their polar factors; ΔW = λ·U⊥·diag(σ)·V⊥. At most k in all; k < T
  (nothing to split) is refused.
- iso_c (Marczak et al., ICML 2025): Σ τᵢ = U·Σ·Vᵀ → λ·σ̄·U·Vᵀ with σ̄ the mean of the nonzero
  singular values (the zeros of a low-rank sum are not averaged in).
- iso_cts: a common subspace (the top ⌊f·D⌋ directions of the sum, adjusted so the rest splits
  evenly) plus each task's top directions of (I − U_cU_cᵀ)·τᵢ, polar-orthogonalised, flattened
  to the mean nonzero singular value. D = --rank, default Σrᵢ (the official code,
  danielm1405/iso-merging, takes D = min(m, n) of a dense delta). "Nonzero" is measured
  against the tasks' size: flattening gives every kept direction the mean singular value, so a
  rounding-level residual (a task inside the common subspace) must not count; the official
  code, on full-rank dense deltas, never meets one.
"""

from __future__ import annotations

import torch

from .. import linalg
from ..errors import UsageError
from .registry import ModuleContext, Param, Term, register
from .sparsify import DENSITY, LAMBDA, MAJORITY, dare, magnitude_threshold, ties_merge, trim
from .spaces import uniform_draws


def _task_factors(terms: list[Term], ctx: ModuleContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factors of τᵢ = wᵢ·ΔWᵢ per task, float64 (KnOTS, TSV and Iso use only SVDs of the τᵢ,
    their concatenation or their sum, so the split does not matter; float64 keeps them exact and
    rounded once)."""
    return [t.scaled_factors(ctx, torch.float64) for t in terms]


def _balanced(U: torch.Tensor, values: torch.Tensor, Vh: torch.Tensor):
    """(up, down) with up@down = U·diag(values)·Vh, |values| split evenly, signs on up."""
    root = values.abs().sqrt()
    return U * (root * values.sign()), root[:, None] * Vh


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of X (p×k): u·vh from X's thin SVD."""
    u, _, vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (u @ vh).to(X.dtype)


# --------------------------------------------------------------------------------------------
# KnOTS


def knots_decomposition(terms: list[Term], ctx: ModuleContext):
    """(U m×k, [Σ·Vᵢᵀ] each k×n) for the concatenation [τ₁ … τ_T], from the factors, float64.
    That SVD depends on the τᵢ alone, not on how each is factored (no canonical step needed);
    float64 keeps what the factorisation leaves in the last bits below float32's."""
    pairs = _task_factors(terms, ctx)
    B = torch.cat([up for up, _ in pairs], dim=1)
    Q, R_B = torch.linalg.qr(B)
    blocks, col = [], 0
    for up, down in pairs:
        r = up.shape[1]
        blocks.append(R_B[:, col:col + r] @ down)
        col += r
    core = torch.cat(blocks, dim=1)  # R × (T·n)
    P, S, Zh = torch.linalg.svd(core, full_matrices=False)
    # zero at float64's precision: the factors are exact, so every direction above that is real
    k = max(linalg.numerical_rank(S, (B.shape[0], core.shape[1]), torch.float64), 1)
    U = Q @ P[:, :k]
    # deterministic signs: TIES by frequency breaks an even vote towards +, so it sees them
    signs = linalg.column_signs(U)
    n = pairs[0][1].shape[1]
    scaled = [(signs * S[:k])[:, None] * Zh[:k, i * n:(i + 1) * n] for i in range(len(pairs))]
    return U * signs, scaled


def _knots_global_thresholds(modules, params) -> dict[int, float]:
    """Per task, the magnitude of its top-density entry over Σ·Vᵢᵀ of all modules."""
    magnitudes: dict[int, list[torch.Tensor]] = {}
    for terms, ctx in modules:
        _, scaled = knots_decomposition(terms, ctx)
        for t, block in zip(terms, scaled):
            magnitudes.setdefault(t.index, []).append(block.abs().reshape(-1).cpu())
    threshold = magnitude_threshold(params["density"])
    return {index: threshold(torch.cat(parts)) for index, parts in magnitudes.items()}


def _knots_prepare(modules, params):
    if params["merge"] == "linear" or params["topk_scope"] != "global" or params["density"] >= 1:
        return None
    return _knots_global_thresholds(modules, params)


@register(
    "knots",
    "KnOTS (Stoica et al. 2025): align tasks by the SVD of their concatenation, merge the right factors",
    params=(
        Param("merge", str, "ties", "rule for the Σ·Vᵢᵀ blocks", choices=("ties", "dare_ties", "linear")),
        DENSITY, MAJORITY, LAMBDA,
        Param("topk_scope", str, "global", "top-k mask over all layers (the paper) or per layer",
              choices=("global", "layer")),
    ),
    prepare=_knots_prepare,
)
def knots(terms: list[Term], ctx: ModuleContext, **p):
    U, scaled = knots_decomposition(terms, ctx)
    tau = torch.stack(scaled)
    if p["merge"] == "linear":
        merged = tau.sum(0)
    else:
        if p["merge"] == "dare_ties":
            tau = dare(tau, p["density"], uniform_draws(terms, ctx, tau.shape[1:]))
        else:
            tau = _knots_trim(tau, terms, ctx, p)
        merged = ties_merge(tau, p["majority"])
    return U * p["lambda"], merged


def _knots_trim(tau: torch.Tensor, terms: list[Term], ctx: ModuleContext, p) -> torch.Tensor:
    if p["density"] >= 1:
        return tau
    if ctx.shared is None:  # per-layer top-k
        thresholds = [magnitude_threshold(p["density"])(t.abs().reshape(-1)) for t in tau]
    else:
        thresholds = [ctx.shared[t.index] for t in terms]
    return trim(tau, thresholds)


# --------------------------------------------------------------------------------------------
# TSV and Iso


def _task_svds(pairs) -> list[linalg.LowRankSVD]:
    out = []
    for up, down in pairs:
        svd = linalg.svd_of_product(up, down)
        out.append(svd.truncate(max(linalg.numerical_rank(svd.S, (up.shape[0], down.shape[1])), 1)))
    return out


@register("tsv", "Task Singular Vectors merge (Gargiulo et al. 2025): top rank/T triplets per task, orthogonalised",
          params=(LAMBDA,), uses_rank=True)
def tsv(terms: list[Term], ctx: ModuleContext, **p):
    pairs = _task_factors(terms, ctx)
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    budget = min(ctx.rank if ctx.rank is not None else sum(t.module.rank for t in terms), m, n)
    per_task = budget // len(terms)
    if per_task == 0:  # the paper's equal split has nothing to give; rank T would exceed --rank
        raise UsageError(f"tsv gives each task rank/T singular triplets, but module {ctx.key} has "
                         f"{len(terms)} tasks and rank {budget}; use --rank {len(terms)} or more")
    svds = [s.truncate(min(per_task, s.S.numel())) for s in _task_svds(pairs)]
    U = torch.cat([s.U for s in svds], dim=1)
    S = torch.cat([s.S for s in svds])
    Vh = torch.cat([s.Vh for s in svds], dim=0)
    return _balanced(polar(U), p["lambda"] * S, polar(Vh.T).T)


@register("iso_c", "Iso-C (Marczak et al. 2025): flatten the summed update's spectrum to its mean nonzero value",
          params=(LAMBDA,), uses_rank=True)
def iso_c(terms: list[Term], ctx: ModuleContext, **p):
    pairs = _task_factors(terms, ctx)
    B, A = linalg.stack(pairs)
    svd = linalg.svd_of_product(B, A)
    k = max(linalg.numerical_rank(svd.S, (B.shape[0], A.shape[1]), scale=max(linalg.product_norms(pairs))), 1)
    if ctx.rank is not None:
        k = min(k, ctx.rank)
    kept = svd.truncate(k)
    flat = torch.full_like(kept.S, p["lambda"] * float(kept.S.mean()))
    return _balanced(kept.U, flat, kept.Vh)


@register("iso_cts", "Iso-CTS: a common subspace plus task-specific directions, orthogonalised and flattened",
          params=(Param("common_fraction", float, 0.8, "share of the rank budget for the common subspace",
                        low=0.0, high=1.0), LAMBDA), uses_rank=True)
def iso_cts(terms: list[Term], ctx: ModuleContext, **p):
    pairs = _task_factors(terms, ctx)
    T = len(pairs)
    B, A = linalg.stack(pairs)
    m, n = B.shape[0], A.shape[1]
    budget = min(ctx.rank if ctx.rank is not None else B.shape[1], m, n)
    k_common = int(budget * p["common_fraction"])
    k_common = budget - round((budget - k_common) / T) * T  # the rest splits evenly over tasks
    per_task = (budget - k_common) // T
    total = linalg.svd_of_product(B, A)
    # Every kept direction gets the mean singular value, so none may be rounding: the sum's
    # rank is counted against the largest task, each residual's against its own task (float32's
    # floor: what the inputs are known to), never against their own largest value. A LoRA
    # merged with itself then leaves residuals of rank 0, not per_task random directions.
    sizes = linalg.product_norms(pairs)
    k_common = min(max(k_common, 0), linalg.numerical_rank(total.S, (m, n), scale=max(sizes)))
    common = total.truncate(k_common)
    Us, Ss, Vs = [], [], []
    for (up, down), size in zip(pairs, sizes):
        residual = up - common.U @ (common.U.T @ up)  # (I − U_c U_cᵀ) τᵢ, still factored
        svd = linalg.svd_of_product(residual, down)
        keep = min(per_task, linalg.numerical_rank(svd.S, (m, n), scale=size))
        if keep:
            Us.append(svd.U[:, :keep]), Ss.append(svd.S[:keep]), Vs.append(svd.Vh[:keep])
    Us.append(common.U), Ss.append(common.S), Vs.append(common.Vh)
    U, S, Vh = torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vs, dim=0)
    nonzero = S[S > 0]
    mean = float(nonzero.mean()) if nonzero.numel() else 0.0
    return _balanced(polar(U), torch.full_like(S, p["lambda"] * mean), polar(Vh.T).T)
