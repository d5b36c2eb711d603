"""Module types whose change depends on the base weight W: each maps W to the new weight W'.

Written from the formulas of the trainers that produce them (LyCORIS 4.x, PEFT); the tests
compare every one with those libraries' own construction of the weight.

- DoRA (PEFT ``lora_magnitude_vector``, LyCORIS ``dora_scale`` on LoRA/LoCon/LoHa/LoKr):
  W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken per output row (PEFT; LyCORIS with a magnitude
  of shape (out, 1…)) or per input column (LyCORIS with a magnitude of shape (1, in, 1…)).
  LyCORIS adds float eps to the norm; PEFT does not; neither is done here (a relative
  difference of ~1e-7 on real weights).
- IA3 (LyCORIS ``weight`` + ``on_input``): W' = W ⊙ (1 + s), s scaling the output rows, or the
  input columns when ``on_input`` is set.
- OFT (LyCORIS diag-OFT ``oft_blocks`` k×b×b, optional ``rescale``, ``alpha`` = constraint):
  Q = B − Bᵀ (clipped to ‖Q‖ ≤ alpha·out when alpha > 0), R = (I + Q)(I − Q)⁻¹ per block, and
  the rows of each block of W rotated: W'ₖ = Rₖᵀ·Wₖ, then rows × rescale.
- BOFT (``oft_blocks`` m×k×b×b): m butterfly stages; stage i permutes the rows in groups of
  2·2ⁱ·b/2 (interleaving the two halves), applies block-diagonal R (W ← R·W per block of b
  rows) and permutes back; then rows × rescale.
- GLoRA (``a1 a2 b1 b2 [bm]``, ``alpha``): W' = W + (alpha/r)·(W·A + B), A = a1·a2 (in×in,
  acting on the input channels), B = b1·b2 (with a Tucker core ``bm`` for convs).

A weight w given to any of them applies w·(W' − W), so fusing, attaching and merging against a
base all stay linear (at w = 1 this is exactly the trainer's weight; ComfyUI's strength has the
same meaning for DoRA; PEFT scales inside the normalisation, LyCORIS's multiplier interpolates
DoRA's scale and BOFT's stages, so those differ at w ≠ 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """W → W' for one module: its tensors (read lazily) and the formula applied to them."""

    kind: str
    load: Callable[[], Tensors]
    formula: Callable[[torch.Tensor, Tensors], torch.Tensor]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.formula(weight, self.load())

    def materialized(self) -> "Transform":
        tensors = {k: v.clone() for k, v in self.load().items()}
        return Transform(self.kind, lambda: tensors, self.formula)


def _axis_shape(weight: torch.Tensor, axis: int) -> tuple[int, ...]:
    """The shape that broadcasts a vector along ``axis`` (0: rows, 1: input channels)."""
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return tuple(shape)


def dora(weight: torch.Tensor, t: Tensors, axis: int) -> torch.Tensor:
    v = weight + t["delta"]
    moved = v.transpose(0, axis) if axis else v
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = _axis_shape(v, axis)
    return v * (t["magnitude"].reshape(shape) / norm.reshape(shape))


def ia3(weight: torch.Tensor, t: Tensors, axis: int) -> torch.Tensor:
    return weight * (1 + t["scale"].reshape(_axis_shape(weight, axis)))


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ (per block, float64), Q clipped to ‖Q‖ ≤ constraint."""
    b = blocks.double()
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        norm = float(q.norm()) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(b.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rescaled(new: torch.Tensor, t: Tensors) -> torch.Tensor:
    if "rescale" in t:
        new = new * t["rescale"].double().reshape(_axis_shape(new, 0))
    return new


def oft(weight: torch.Tensor, t: Tensors, constraint: float) -> torch.Tensor:
    r = cayley(t["blocks"], constraint)
    k, b, _ = r.shape
    w = weight.double().reshape(k, b, -1)
    new = torch.einsum("knm,knc->kmc", r, w).reshape(weight.shape)  # Rₖᵀ·Wₖ
    return _rescaled(new, t).to(weight.dtype)


def butterfly_order(rows: int, span: int) -> torch.Tensor:
    """Row order of a butterfly stage: groups of 2·span rows, their two halves interleaved."""
    return torch.arange(rows).reshape(-1, 2, span).transpose(1, 2).reshape(-1)


def boft(weight: torch.Tensor, t: Tensors, constraint: float) -> torch.Tensor:
    r = cayley(t["blocks"], constraint)
    stages, k, b, _ = r.shape
    w = weight.double().reshape(weight.shape[0], -1)
    for i in range(stages):
        order = butterfly_order(w.shape[0], 2 ** i * (b // 2))
        mixed = torch.einsum("kij,kjc->kic", r[i], w[order].reshape(k, b, -1)).reshape(w.shape)
        w = torch.empty_like(mixed)
        w[order] = mixed
    return _rescaled(w.reshape(weight.shape), t).to(weight.dtype)


def glora(weight: torch.Tensor, t: Tensors, scale: float) -> torch.Tensor:
    a1, a2 = t["a1"].reshape(t["a1"].shape[0], -1), t["a2"].reshape(t["a2"].shape[0], -1)
    wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", weight, a1), a2)
    b1, b2 = t["b1"].reshape(t["b1"].shape[0], -1), t["b2"].reshape(t["b2"].shape[0], -1)
    if "bm" in t:
        b = torch.einsum("mn...,im,nj->ij...", t["bm"], b1, b2)
    else:
        b = (b1 @ b2).reshape(weight.shape)
    return weight + scale * (wa + b)


def boft_rows_ok(rows: int, stages: int, block: int) -> bool:
    return block % 2 == 0 and all(rows % (2 ** (i + 1) * (block // 2)) == 0 for i in range(stages))


def full_rank(shape: tuple[int, ...]) -> int:
    return min(shape[0], math.prod(shape[1:]))
