"""Sparsifying merges on task deltas τᵢ = wᵢ·ΔWᵢ (weights folded in first), in Core Space or
on the dense delta (see :mod:`.spaces`).

Conventions (the papers' formulas; where implementations differ, which one we follow):
- trim: keep the top k = int(density·numel) entries of |τᵢ| per module (PEFT, mergekit; the
  TIES/KnOTS reference code keeps int(d·K)+1 and trims over the whole model at once). The
  k-th magnitude is found by linear-time selection; entries tied with it are all kept.
- sign election: γ = sign(Σᵢ τ̃ᵢ) ("total", the mass of the weighted deltas) or
  sign(Σᵢ sign τ̃ᵢ) ("frequency"); ties go to +. PEFT elects on the unweighted deltas, which
  is the same thing when the weights are equal.
- disjoint mean: Σᵢ τ̃ᵢ·[sign τ̃ᵢ = γ] / #{i: τ̃ᵢ ≠ 0, sign τ̃ᵢ = γ} (PEFT; mergekit divides by
  the sum of the agreeing weights instead).
- DARE rescales kept entries by 1/density (the paper and PEFT; mergekit now matches L1 norms).
- DELLA keeps entry e of a row with p = (d − ε) + 2ε·(rank(|τₑ|) − 1)/(n − 1) (ranks 1…n by
  magnitude within the row) and rescales it by 1/p, then elects signs and takes the disjoint
  mean.
- breadcrumbs drops the largest int(γ·N) entries and the smallest, keeping int(density·N)
  per module (mergekit's per-tensor form, without its γ·N < 1 bug that zeroes the tensor).
  When density + γ > 1 density wins and fewer large entries are dropped (mergekit does the
  same): density is what every sparsifier here promises.
Every result is multiplied by ``lambda``.
"""

from __future__ import annotations

import torch

from .registry import ModuleContext, Param, Term, register
from .spaces import SPACE_PARAMS, Rule, kth_largest, merge_in_space

DENSITY = Param("density", float, 0.5, "fraction of entries each task keeps", low=0.0, high=1.0)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged delta")
MAJORITY = Param("majority", str, "total", "sign election: total (mass) or frequency (count)",
                 choices=("total", "frequency"))


# --------------------------------------------------------------------------------------------
# building blocks on a block of task matrices τ (T × rows × q)


def magnitude_threshold(density: float):
    """Per-task statistic: the magnitude of the top int(density·N)-th entry."""
    return lambda abs_values: kth_largest(abs_values, int(density * abs_values.numel()))


def trim(tau: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Keep each task's entries at or above its threshold."""
    limits = torch.tensor(thresholds, dtype=tau.dtype).reshape(-1, *([1] * (tau.dim() - 1)))
    return tau * (tau.abs() >= limits)


def elect_sign(tau: torch.Tensor, majority: str = "total") -> torch.Tensor:
    mass = tau.sum(0) if majority == "total" else tau.sign().sum(0)
    return torch.where(mass >= 0, 1.0, -1.0).to(tau.dtype)


def disjoint_mean(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Σ of the entries agreeing with the elected sign / their count (zeros never agree)."""
    aligned = tau * sign
    count = (aligned > 0).sum(0, dtype=tau.dtype).clamp_min(1)
    return sign * aligned.clamp_min(0).sum(0) / count


def ties_merge(tau: torch.Tensor, majority: str) -> torch.Tensor:
    return disjoint_mean(tau, elect_sign(tau, majority))


def dare(tau: torch.Tensor, density: float, draws: torch.Tensor) -> torch.Tensor:
    """Keep an entry when its uniform draw is below density; rescale kept entries by 1/density."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    return tau * (draws < density).to(tau.dtype) / density


def della_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (d − ε) + 2ε·(rank − 1)/(n − 1) per row, rank 1…n by |τ| ascending within the row."""
    n = tau.shape[-1]
    if n == 1:
        return torch.full_like(tau, density)
    order = tau.abs().argsort(dim=-1)
    # rank of each entry = its position in the sorted order: one scatter, not a second sort
    positions = torch.arange(n, dtype=tau.dtype, device=tau.device).expand(tau.shape)
    ranks = torch.empty_like(tau).scatter_(-1, order, positions)  # 0…n−1
    return (density - epsilon) + 2 * epsilon * ranks / (n - 1)


def della(tau: torch.Tensor, density: float, epsilon: float, draws: torch.Tensor) -> torch.Tensor:
    p = della_keep_probabilities(tau, density, epsilon)
    return torch.where(draws < p, tau / p, torch.zeros_like(tau))


def breadcrumb_thresholds(density: float, gamma: float):
    """Per task: (hi, lo) so that lo ≤ |τ| < hi keeps int(density·N) entries just below the
    largest ones dropped: int(γ·N) of them, fewer when density + γ > 1 (density wins)."""
    def stats(abs_values):
        n = abs_values.numel()
        n_keep = int(density * n)
        n_top = min(int(gamma * n), n - n_keep)
        hi = kth_largest(abs_values, n_top) if n_top else float("inf")
        lo = kth_largest(abs_values, n_top + n_keep) if n_keep else float("inf")
        return hi, lo

    return stats


def breadcrumbs_mask(tau: torch.Tensor, stats: list[tuple[float, float]]) -> torch.Tensor:
    shape = (-1, *([1] * (tau.dim() - 1)))
    hi = torch.tensor([s[0] for s in stats], dtype=tau.dtype).reshape(shape)
    lo = torch.tensor([s[1] for s in stats], dtype=tau.dtype).reshape(shape)
    magnitude = tau.abs()
    return tau * ((magnitude < hi) & (magnitude >= lo))


# --------------------------------------------------------------------------------------------
# registered methods


def _spaced(terms: list[Term], ctx: ModuleContext, rule: Rule, params: dict):
    return merge_in_space(terms, ctx, rule, params["space"], params["oversample"], params["power_iters"])


@register("task_arithmetic", "λ·Σ wᵢΔWᵢ computed in the chosen space (in core space it equals `linear`)",
          params=(LAMBDA, *SPACE_PARAMS), uses_rank=True)
def task_arithmetic(terms, ctx, **p):
    return _spaced(terms, ctx, Rule(lambda tau, stats, draws: p["lambda"] * tau.sum(0)), p)


@register("ties", "TIES (Yadav et al. 2023): trim, elect sign, disjoint mean, × lambda",
          params=(DENSITY, MAJORITY, LAMBDA, *SPACE_PARAMS), uses_rank=True)
def ties(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * ties_merge(trim(tau, stats), p["majority"])

    return _spaced(terms, ctx, Rule(apply, magnitude_threshold(p["density"])), p)


@register("dare_linear", "DARE (Yu et al. 2024): random drop with 1/density rescale, then sum",
          params=(DENSITY, LAMBDA, *SPACE_PARAMS), uses_rank=True)
def dare_linear(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * dare(tau, p["density"], draws).sum(0)

    return _spaced(terms, ctx, Rule(apply, random=True), p)


@register("dare_ties", "DARE drop and rescale, then TIES sign election and disjoint mean",
          params=(DENSITY, MAJORITY, LAMBDA, *SPACE_PARAMS), uses_rank=True)
def dare_ties(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * ties_merge(dare(tau, p["density"], draws), p["majority"])

    return _spaced(terms, ctx, Rule(apply, random=True), p)


@register("magnitude_prune", "keep each task's top-density entries by magnitude, then sum",
          params=(DENSITY, LAMBDA, *SPACE_PARAMS), uses_rank=True)
def magnitude_prune(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * trim(tau, stats).sum(0)

    return _spaced(terms, ctx, Rule(apply, magnitude_threshold(p["density"])), p)


@register("breadcrumbs", "Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest gamma and the smallest, sum",
          params=(Param("density", float, 0.9, "fraction of entries each task keeps", low=0.0, high=1.0),
                  Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped", low=0.0, high=1.0),
                  LAMBDA, *SPACE_PARAMS), uses_rank=True)
def breadcrumbs(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * breadcrumbs_mask(tau, stats).sum(0)

    return _spaced(terms, ctx, Rule(apply, breadcrumb_thresholds(p["density"], p["gamma"])), p)


def _check_della(p: dict) -> None:
    if not (0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] <= 1):
        from ..errors import UsageError

        raise UsageError(f"della needs 0 < density ± epsilon ≤ 1, got density {p['density']}, epsilon {p['epsilon']}")


@register("della", "DELLA (Deep et al. 2024): magnitude-ranked drop per row, 1/p rescale, sign election, disjoint mean",
          params=(DENSITY, Param("epsilon", float, 0.15, "half-width of the keep-probability window", low=0.0, high=0.5),
                  MAJORITY, LAMBDA, *SPACE_PARAMS), uses_rank=True, check=_check_della)
def della_ties(terms, ctx, **p):
    def apply(tau, stats, draws):
        return p["lambda"] * ties_merge(della(tau, p["density"], p["epsilon"], draws), p["majority"])

    return _spaced(terms, ctx, Rule(apply, random=True), p)
