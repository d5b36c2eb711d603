"""Exact factorisations of the module types that are not plain LoRA.

Every type becomes factors (up, down) whose product is its delta *exactly* — no SVD, no
truncation — so merging and writing treat all types alike:

- LoRA with a Tucker core (``lora_mid``): the core folds into the down factor, rank r.
- LoHa: (U1 V1) ⊙ (U2 V2) = KR(U1, U2) · KR(V1ᵀ, V2ᵀ)ᵀ with row-wise Khatri–Rao products,
  rank r1·r2.
- LoKr: kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2), rank r1·r2 (a full operand p×q
  counts as rank min(p, q)).
- full (``diff``): ΔW as (I, ΔW) or (ΔW, I), rank min(m, n).
When r1·r2 reaches min(m, n) the dense form is smaller and is used instead.

Scales follow LyCORIS (and ComfyUI, which loads these files): alpha / (rank of the decomposed
factor); 1 when alpha is absent or no operand is decomposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Getter = Callable[[str], torch.Tensor]  # suffix → float32 tensor

KIND_SUFFIXES = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": (),  # any of lokr_w1, lokr_w1_a, lokr_w2, lokr_w2_a
    "full": ("diff",),
}


@dataclass(frozen=True)
class Plan:
    rank: int  # rank of the exact factors we will produce
    ref_rank: int | None  # alpha / ref_rank is the file's scale; None → scale 1
    dense: bool  # factors are (I, ΔW) / (ΔW, I)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def tucker_down(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker core mid (r, r, kh, kw) into down (r, in, 1, 1) → (r, in·kh·kw).

    The delta kernel is Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i], so down'[a,(i,h,w)] = Σ_b mid[a,b,h,w]·down[b,i].
    """
    return _flat(torch.einsum("abhw,bi->aihw", mid, _flat(down)))


def _cp_factors(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor):
    """LyCORIS CP form W[p,r,h,w] = Σ_ij t[i,j,h,w]·wb[j,r]·wa[i,p] as (U = waᵀ, V)."""
    v = torch.einsum("ijhw,jr->irhw", t, _flat(wb))
    return _flat(wa).T, _flat(v)


def dense_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of an m×n matrix: (I_m, ΔW) if m ≤ n, else (ΔW, I_n)."""
    m, n = delta.shape
    if m <= n:
        return torch.eye(m, dtype=delta.dtype), delta
    return delta, torch.eye(n, dtype=delta.dtype)


def khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri–Rao product: out[i, (p, q)] = a[i, p]·b[i, q]."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Planning from shapes alone (the header), so ranks are known before any data is read.


def plan(kind: str, shapes: dict[str, tuple[int, ...]], shape: tuple[int, ...]) -> Plan:
    full_rank = min(shape[0], math.prod(shape[1:]))
    if kind == "full":
        return Plan(full_rank, None, True)
    if kind == "loha":
        r1 = shapes["hada_t1"][0] if "hada_t1" in shapes else shapes["hada_w1_b"][0]
        r2 = shapes["hada_t2"][0] if "hada_t2" in shapes else shapes["hada_w2_b"][0]
        ref = shapes["hada_w1_b"][0]
        return Plan(r1 * r2, ref, False) if r1 * r2 < full_rank else Plan(full_rank, ref, True)
    if kind == "lokr":
        r1, ref1 = _lokr_operand_rank(shapes, 1)
        r2, ref2 = _lokr_operand_rank(shapes, 2)
        ref = ref2 if ref2 is not None else ref1
        return Plan(r1 * r2, ref, False) if r1 * r2 < full_rank else Plan(full_rank, ref, True)
    raise ValueError(kind)


def _lokr_operand_rank(shapes, i: int) -> tuple[int, int | None]:
    if f"lokr_w{i}" in shapes:
        s = shapes[f"lokr_w{i}"]
        return min(s[0], math.prod(s[1:])), None
    if i == 2 and "lokr_t2" in shapes:
        return shapes["lokr_t2"][0], shapes["lokr_w2_b"][0]
    r = shapes[f"lokr_w{i}_b"][0]
    return r, r


# --------------------------------------------------------------------------------------------
# Building the factors (reads data).


def loha_factors(get: Getter, has: Callable[[str], bool]):
    if has("hada_t1"):
        u1, v1 = _cp_factors(get("hada_t1"), get("hada_w1_a"), get("hada_w1_b"))
        u2, v2 = _cp_factors(get("hada_t2"), get("hada_w2_a"), get("hada_w2_b"))
    else:
        u1, v1 = _flat(get("hada_w1_a")), _flat(get("hada_w1_b"))
        u2, v2 = _flat(get("hada_w2_a")), _flat(get("hada_w2_b"))
    return khatri_rao_rows(u1, u2), khatri_rao_rows(v1.T, v2.T).T


def _lokr_operand(get: Getter, has: Callable[[str], bool], i: int):
    """One Kronecker operand, flattened to 2-D, as factors (U, V)."""
    if has(f"lokr_w{i}"):
        return dense_factors(_flat(get(f"lokr_w{i}")))
    if i == 2 and has("lokr_t2"):
        return _cp_factors(get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
    return _flat(get(f"lokr_w{i}_a")), _flat(get(f"lokr_w{i}_b"))


def lokr_factors(get: Getter, has: Callable[[str], bool]):
    # kron(W1, W2) flattened to (p·m', q·n'·kh·kw) equals kron(W1, flat(W2)): the kernel dims
    # belong to W2's columns, so the 2-D identity kron(AB, CD) = kron(A, C)·kron(B, D) applies.
    u1, v1 = _lokr_operand(get, has, 1)
    u2, v2 = _lokr_operand(get, has, 2)
    c = torch.Tensor.contiguous  # torch.kron needs contiguous operands
    return torch.kron(c(u1), c(u2)), torch.kron(c(v1), c(v2))


def build_factors(kind: str, get: Getter, has: Callable[[str], bool], the_plan: Plan, shape):
    """Exact (up, down), 2-D, unscaled, for a module planned by :func:`plan`."""
    if kind == "full":
        return dense_factors(_flat(get("diff")))
    up, down = loha_factors(get, has) if kind == "loha" else lokr_factors(get, has)
    if the_plan.dense:
        return dense_factors((up @ down).reshape(shape[0], -1))
    return up, down
