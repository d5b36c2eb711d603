"""Low-rank kernels: exact SVDs of sums of LoRAs computed from their factors.

A sum Σ ΔWᵢ = B·A with B = [B₁ … B_T] (m×R) and A = [A₁; …; A_T] (R×n). Its SVD comes from
thin QRs of B and Aᵀ and the SVD of the R×R core R_B·R_Aᵀ — O((m+n)R² + R³) instead of the
O(mn·min(m, n)) of a dense SVD, and never an m×n matrix in memory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def single_threaded():
    """Run torch's CPU kernels on one thread inside, restoring the count after. MKL's QR and
    SVD (float64 too), long-sum GEMMs and dot products split their sums by thread count, so
    their last bits — and a merged file's bytes — would depend on it."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    """Exact thin SVD of B@A from the factors (B m×R, A R×n), in B's dtype.

    The QRs and the core run in float64 and are rounded once at the end: the O((m+n)R²) work is
    small, and small singular values of a widely spread spectrum stay accurate."""
    dtype = B.dtype
    Qb, Rb = torch.linalg.qr(B.double())  # m×R', R'×R
    Qa, Ra = torch.linalg.qr(A.double().T)  # n×R'', R''×R
    P, S, Qh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return LowRankSVD((Qb @ P).to(dtype), S.to(dtype), (Qh @ Qa.T).to(dtype))


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
                   scale: float | None = None) -> int:
    """Singular values above the noise floor scale·max(m, n)·ε(dtype) (the usual rank
    tolerance). ``scale`` defaults to σ₁; pass a task's or a sum's σ₁ to measure a residual
    against what it was cut from, not against its own (possibly rounding-level) largest value."""
    if S.numel() == 0:
        return 0
    scale = float(S[0]) if scale is None else scale
    if scale == 0.0:
        return 0
    tol = scale * max(shape) * torch.finfo(dtype).eps
    return int((S > tol).sum())


def rank_at_precision(S: torch.Tensor, eps: float) -> int:
    """The smallest k whose dropped tail is at most a quarter ulp of the whole:
    ‖σ_{k+1:}‖ ≤ ε/4·‖σ‖. Writing the factors rounds them by up to about one ulp of ΔW, so the
    cut adds at most a quarter of that (genuine values above it are all kept)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[k] = Σ_{j≥k} σⱼ²
    limit = (eps / 4) ** 2 * total
    return int((tail > limit).sum())


def column_signs(U: torch.Tensor) -> torch.Tensor:
    """±1 per column, making its largest-magnitude entry positive (+x over −x on a tie): a
    deterministic sign for singular vectors, which LAPACK leaves to chance. (Two plain
    reductions: argmax down the columns is several times slower.)"""
    return torch.where(U.amax(0) >= -U.amin(0), 1.0, -1.0).to(U.dtype)


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


def product_norms(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """‖upᵢ@downᵢ‖_F per pair (≥ σ₁): what rounding in a sum or a residual of them is relative
    to — a sum is only as exact as its terms, and its own σ₁ may be rounding itself."""
    return [frobenius_norm_of_product(up, down) for up, down in pairs]


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


def balance_for_storage(up: torch.Tensor, down: torch.Tensor, window: float = 2.0 ** 8):
    """(up, down, scale) with scale·up@down equal to the input, changed by powers of two only
    (so not one digit moves): each rank-1 term's two factors get about the same largest
    magnitude, and if that leaves [1/window, window] a common power of four moves into
    ``scale`` (the module's alpha/r), so fp16 factors of a tiny or huge ΔW neither underflow
    nor overflow."""
    a, b = up.abs().amax(0), down.abs().amax(1)
    live = (a > 0) & (b > 0)
    shift = torch.where(live, torch.round((torch.log2(b) - torch.log2(a)) / 2), torch.zeros_like(a))
    # exact powers of two, built on the k-vector (ldexp on the whole factors is slow)
    powers = torch.ldexp(torch.ones_like(shift), shift.long())
    peak = float(torch.maximum(a * powers, b / powers).max()) if a.numel() else 0.0
    e = 0 if peak == 0.0 or 1 / window <= peak <= window else math.floor(math.log2(peak))
    return up * (powers * 2.0 ** -e), down * (2.0 ** -e / powers)[:, None], 2.0 ** (2 * e)
