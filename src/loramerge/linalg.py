"""Low-rank kernels: exact SVDs of sums of LoRAs computed from their factors.

A sum Σ ΔWᵢ = B·A with B = [B₁ … B_T] (m×R) and A = [A₁; …; A_T] (R×n). Its SVD comes from
thin QRs of B and Aᵀ and the SVD of the R×R core R_B·R_Aᵀ — O((m+n)R² + R³) instead of the
O(mn·min(m, n)) of a dense SVD, and never an m×n matrix in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankSVD:
    U: torch.Tensor  # m×k, orthonormal columns
    S: torch.Tensor  # k, descending
    Vh: torch.Tensor  # k×n, orthonormal rows

    def truncate(self, k: int) -> "LowRankSVD":
        return LowRankSVD(self.U[:, :k], self.S[:k], self.Vh[:k])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with up@down = U·diag(S)·Vh, √S on each side (balanced magnitudes)."""
        root = self.S.clamp_min(0).sqrt()
        return self.U * root, root[:, None] * self.Vh

    @property
    def energy(self) -> torch.Tensor:
        return (self.S.double() ** 2).sum()


def stack(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(up m×rᵢ, down rᵢ×n)] → (B m×R, A R×n) with B@A = Σ upᵢ@downᵢ."""
    return torch.cat([u for u, _ in pairs], dim=1), torch.cat([d for _, d in pairs], dim=0)


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> LowRankSVD:
    """Exact thin SVD of B@A from the factors (B m×R, A R×n)."""
    dtype = B.dtype
    Qb, Rb = torch.linalg.qr(B)  # m×R', R'×R
    Qa, Ra = torch.linalg.qr(A.T)  # n×R'', R''×R
    # The core is tiny; float64 there costs nothing and keeps small singular values accurate.
    core = Rb.double() @ Ra.double().T
    P, S, Qh = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ P.to(dtype)
    Vh = Qh.to(dtype) @ Qa.T
    return LowRankSVD(U, S.to(dtype), Vh)


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above the float32 noise floor σ₁·max(m, n)·ε (the usual rank tolerance)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values keep ``energy`` of Σσ² (Frobenius energy)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def frobenius_norm_of_product(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B@A‖_F from the factors: √trace((BᵀB)(AAᵀ)), never forming B@A."""
    gram = (B.double().T @ B.double()) * (A.double() @ A.double().T)
    return float(gram.sum().clamp_min(0).sqrt())


def randomized_svd(M: torch.Tensor, k: int, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None) -> LowRankSVD:
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011) of a dense matrix.

    Sketch with k + oversample Gaussian vectors, ``power_iters`` subspace iterations
    (re-orthonormalised each time), then an exact SVD of the small projected matrix.
    """
    m, n = M.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=M.dtype, device="cpu").to(M.device)
    sketch = M @ omega
    Q, _ = torch.linalg.qr(sketch)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    small = Q.T @ M  # width×n
    # SVD of the wide width×n matrix through its QR: small = R2ᵀ·Q2ᵀ, then a width×width SVD
    # (a direct SVD of the wide matrix costs as much as another pass over M)
    Q2, R2 = torch.linalg.qr(small.T)
    Ub, S, Vbh = torch.linalg.svd(R2.T.double(), full_matrices=False)
    U = Q @ Ub.to(M.dtype)
    Vh = Vbh.to(M.dtype) @ Q2.T
    return LowRankSVD(U, S.to(M.dtype), Vh).truncate(min(k, width))


def randomized_svd_for_energy(M: torch.Tensor, energy: float, start_width: int, oversample: int = 10,
                              power_iters: int = 2, generator: torch.Generator | None = None,
                              total_sq: float | None = None) -> LowRankSVD:
    """Randomized SVD just wide enough that its top singular values hold ``energy`` of ‖M‖_F²:
    the sketch doubles until they do (or covers the whole matrix)."""
    if total_sq is None:
        total_sq = float(torch.sum(M * M, dtype=torch.float64))
    width = max(start_width, 1)
    while True:
        svd = randomized_svd(M, width, oversample, power_iters, generator)
        kept = torch.cumsum(svd.S.double() ** 2, 0) / total_sq
        hit = (kept >= energy - 1e-12).nonzero()
        if hit.numel() or width >= min(M.shape):
            return svd.truncate(int(hit[0]) + 1 if hit.numel() else svd.S.numel())
        width = min(2 * width, min(M.shape))
