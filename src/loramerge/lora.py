"""The canonical LoRA model every reader produces and every writer and method consumes.

Per target module: its component (``unet``, ``transformer``, ``text_encoder``…), its module
path in diffusers naming, the target weight's shape, and factors ``up`` (m×r) and ``down``
(r×n; conv: r×(in·kh·kw)) with ``alpha``. The meaning every operation preserves is

    ΔW = (alpha / r) · up @ down        (conv: reshaped to the kernel's shape)

Two kinds of module mean something else:
- vector deltas on a 1-D parameter (LyCORIS ``diff``/``w_norm`` on a LayerNorm/GroupNorm/RMSNorm
  weight): shape ``(n,)``, factors (Δ as n×1, [[1]]), so ``delta()`` is the vector itself; they
  merge linearly whatever the method.
- modules whose change depends on the base weight W (DoRA, IA3, OFT, BOFT, GLoRA): ``transform``
  maps W (float32, the target's shape) to the new weight W'; their change is ΔW = W' − W, known
  only given a base (:meth:`LoraModule.delta_given`). A weight w applies w·(W' − W).
Every module may carry a bias delta (``bias``: Δb, scale folded in), added to the layer's bias.

Factors are loaded lazily, one module at a time, so a set of large LoRAs never sits in memory
at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import NonFiniteError, UnsupportedModuleError

FactorLoader = Callable[[], tuple[torch.Tensor, torch.Tensor]]
WeightTransform = Callable[[torch.Tensor], torch.Tensor]  # W (float32) → W' (formats.transforms.Transform)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A finite sum proves it in one cheap pass; only an overflowing or
    non-finite sum needs the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


@dataclass
class LoraModule:
    component: str
    name: str
    shape: tuple[int, ...]  # the target weight: (out, in) or (out, in, kh, kw)
    rank: int
    alpha: float
    load: FactorLoader = field(repr=False)  # → (up, down) in storage layout and dtype
    kind: str = "lora"  # what the file held: lora, lora+tucker, loha, lokr, full
    dtype: torch.dtype = torch.float32  # storage dtype of the source tensors
    source: str | None = None  # the file it came from, for error messages
    bias: Callable[[], torch.Tensor] | None = field(default=None, repr=False)  # Δbias, scaled
    # what the file itself states (its trainer's dim and alpha), where that differs from the
    # exact factors' rank (a LoKr of dim 4 has ΔW factors of rank up to 16); None: not stated
    file_dim: int | None = None
    file_alpha: float | None = None
    # modules whose change depends on the base weight: W (float32, ``shape``) → W' (module weight 1)
    transform: WeightTransform | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}"

    @property
    def needs_base(self) -> bool:
        """The change depends on the base weight (DoRA, IA3, OFT, BOFT, GLoRA)."""
        return self.transform is not None

    @property
    def is_vector(self) -> bool:
        """An additive delta on a 1-D parameter (a norm layer's weight)."""
        return len(self.shape) == 1

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a base weight of ``shape`` is the one this module changes (a Linear and a
        1×1 conv of the same size alike). A 0 in the module's shape is a side its file does
        not fix (IA3/OFT on a model the key tables do not know): the base's own is taken."""
        if 0 in self.shape:
            return all(s == 0 or s == shape[i] for i, s in enumerate(self.shape[:2])) and len(shape) > 1
        flat = lambda s: (s[0], math.prod(s[1:]))  # noqa: E731
        return flat(tuple(shape)) == flat(self.shape) and (len(shape) == 1) == self.is_vector

    @property
    def label(self) -> str:
        """What the module is, for messages: 'DoRA (LoRA)', 'IA3', 'norm-weight delta'…"""
        return KIND_LABELS.get(self.kind, self.kind)

    def base_error(self) -> UnsupportedModuleError:
        return UnsupportedModuleError(
            f"module {self.key} is {self.label}: its change depends on the base weight, so it has no fixed ΔW; "
            "fuse it into a base, attach it to a pipeline, or merge with --base BASE (a base checkpoint)",
            self.source)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened weight: in·kh·kw for a conv."""
        return math.prod(self.shape[1:])

    def factors(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """(up m×r, down r×n) as 2-D tensors, unscaled; raises on NaN/Inf (and for modules whose
        change depends on the base weight, which have no fixed factors)."""
        if self.needs_base:
            raise self.base_error()
        up, down = self.load()
        up = up.to(device=device, dtype=dtype).reshape(self.out_features, self.rank)
        down = down.to(device=device, dtype=dtype).reshape(self.rank, self.in_features)
        if not (all_finite(up) and all_finite(down)):
            raise NonFiniteError(f"module {self.key} holds NaN or Inf values", self.source)
        return up, down

    def scaled_factors(self, weight: float = 1.0, dtype=torch.float32, device="cpu"):
        """Factors whose product is weight·ΔW, the scale split evenly between both sides."""
        up, down = self.factors(dtype, device)
        s = weight * self.scale
        root = abs(s) ** 0.5
        return up * (root if s >= 0 else -root), down * root

    def delta(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """The dense ΔW in the target weight's shape (for tests, fusing and analysis)."""
        up, down = self.factors(dtype, device)
        return (self.scale * (up @ down)).reshape(self.shape)

    def delta_given(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, the target's shape) given the base weight ``base`` in that shape:
        W' − W for modules that depend on it, the fixed delta otherwise."""
        if not self.needs_base:
            return self.delta(torch.float32, base.device)
        w = base.to(torch.float32)
        if 0 not in self.shape:
            w = w.reshape(self.shape)
        new = self.transform(w)
        if not all_finite(new):
            raise NonFiniteError(f"module {self.key} ({self.label}) gives NaN or Inf on this base weight", self.source)
        return new - w

    def bias_delta(self, dtype=torch.float32) -> torch.Tensor | None:
        if self.bias is None:
            return None
        bias = self.bias().to(dtype)
        if not all_finite(bias):
            raise NonFiniteError(f"module {self.key} holds a NaN or Inf bias delta", self.source)
        return bias

    @classmethod
    def from_factors(
        cls,
        component: str,
        name: str,
        up: torch.Tensor,
        down: torch.Tensor,
        shape: tuple[int, ...],
        alpha: float | None = None,
        kind: str = "lora",
        dtype: torch.dtype | None = None,
        source: str | None = None,
        bias: torch.Tensor | None = None,
    ) -> "LoraModule":
        """A module holding concrete factors (up m×r, down r×n in any layout)."""
        rank = up.shape[1]
        up, down = up.detach(), down.detach()
        return cls(
            component=component,
            name=name,
            shape=tuple(shape),
            rank=rank,
            alpha=float(rank if alpha is None else alpha),
            load=lambda: (up, down),
            kind=kind,
            dtype=dtype or up.dtype,
            source=source,
            bias=(lambda: bias) if bias is not None else None,
        )


KIND_LABELS = {
    "lora+dora": "DoRA (LoRA)", "lora+tucker+dora": "DoRA (LoCon)", "loha+dora": "DoRA (LoHa)",
    "lokr+dora": "DoRA (LoKr)", "ia3": "IA3", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA",
    "norm": "a norm-weight delta",
}


class LoRA:
    """A set of LoRA modules for one architecture, with the header metadata it came with."""

    def __init__(
        self,
        modules: list[LoraModule] | dict[str, LoraModule],
        arch: str,
        format: str = "memory",
        metadata: dict[str, str] | None = None,
        path: str | os.PathLike | None = None,
    ):
        items = modules.values() if isinstance(modules, dict) else modules
        self.modules: dict[str, LoraModule] = {m.key: m for m in sorted(items, key=lambda m: m.key)}
        self.arch = arch
        self.format = format
        self.metadata = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        self.stats: dict[str, dict[str, float]] = {}  # per-module numbers a merge measured
        self.variant: str | None = None  # the full-size model variant, when the file determines it
        self.variants: tuple[str, ...] = ()  # the variants the file fits equally well

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __getitem__(self, key: str) -> LoraModule:
        return self.modules[key]

    def __contains__(self, key: str) -> bool:
        return key in self.modules

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"<LoRA {self.arch} {self.format} {len(self)} modules{where}>"

    @property
    def components(self) -> list[str]:
        """The components the modules belong to, denoisers first."""
        found = {m.component for m in self}
        return sorted(found, key=lambda c: (c.startswith("text_encoder"), c))

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype shared by all modules (float32 when they differ)."""
        dtypes = {m.dtype for m in self}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self]

    def materialize(self) -> "LoRA":
        """A copy whose factors live in memory (useful before the source file changes)."""
        mods = []
        for m in self:
            if m.needs_base:  # the transform's tensors, read once
                bias = m.bias_delta()
                mods.append(replace(m, transform=m.transform.materialized(),
                                    bias=(lambda b=bias: b) if bias is not None else None))
                continue
            up, down = m.load()
            mods.append(LoraModule.from_factors(
                m.component, m.name, up.clone(), down.clone(), m.shape, m.alpha, m.kind, m.dtype,
                m.source, m.bias_delta() if m.bias is not None else None,
            ))
        copy = LoRA(mods, self.arch, self.format, self.metadata, self.path)
        copy.variant, copy.variants = self.variant, self.variants
        return copy
