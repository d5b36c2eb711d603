"""The canonical LoRA model every reader produces and every writer and method consumes.

Per target module: its component (``unet``, ``transformer``, ``text_encoder``…), its module
path in diffusers naming, the target weight's shape, and factors ``up`` (m×r) and ``down``
(r×n; conv: r×(in·kh·kw)) with ``alpha``. The meaning every operation preserves is

    ΔW = (alpha / r) · up @ down        (conv: reshaped to the kernel's shape)

Factors are loaded lazily, one module at a time, so a set of large LoRAs never sits in memory
at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import NonFiniteError

FactorLoader = Callable[[], tuple[torch.Tensor, torch.Tensor]]


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

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}"

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
        """(up m×r, down r×n) as 2-D tensors, unscaled; raises on NaN/Inf."""
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

    def bias_delta(self, dtype=torch.float32) -> torch.Tensor | None:
        return None if self.bias is None else self.bias().to(dtype)

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
        self.variant: str | None = None  # the full-size model variant the shapes fit best

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
            up, down = m.load()
            mods.append(LoraModule.from_factors(
                m.component, m.name, up.clone(), down.clone(), m.shape, m.alpha, m.kind, m.dtype,
                m.source, m.bias_delta() if m.bias is not None else None,
            ))
        copy = LoRA(mods, self.arch, self.format, self.metadata, self.path)
        copy.variant = self.variant
        return copy
