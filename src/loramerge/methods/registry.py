"""The method registry: declared parameters, the per-module context, and :func:`register`.

Method modules import this, never the package: the package imports them to fill the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UsageError
from ..lora import LoraModule


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None

    def coerce(self, value: Any) -> Any:
        value = self._convert(value)
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"parameter {self.name!r} must be one of {', '.join(map(str, self.choices))}")
        if self.kind in (int, float):
            check_number(f"parameter {self.name!r}", value, self.low, self.high)
        return value

    def _convert(self, value: Any) -> Any:
        try:
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError  # int() would truncate 2.5 and choke on nan/inf
            return self.kind(value)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}") from None


MAX_MAGNITUDE = 1e6  # no weight or parameter means anything beyond this; 1e300 would overflow


def check_number(what: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Refuse NaN, ±Inf and absurd magnitudes (NaN passes every comparison, so test it first),
    then the declared range."""
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise UsageError(f"{what} must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{what} must lie in [{low}, {high}], got {value}")


@dataclass
class Term:
    """One input's contribution to one module: weight · ΔW of ``module``."""

    module: LoraModule
    weight: float
    index: int  # position of the input LoRA

    def scaled_factors(self, ctx: "ModuleContext", dtype: torch.dtype | None = None):
        """Factors of wᵢ·ΔWᵢ with the scale split evenly between them (for exact sums), in the
        compute dtype or ``dtype`` (float64 for what must be exact and rounded once)."""
        return self.module.scaled_factors(self.weight, dtype or ctx.dtype, ctx.device)

    def folded_factors(self, ctx: "ModuleContext") -> tuple[torch.Tensor, torch.Tensor]:
        """(wᵢ·sᵢ·Bᵢ, Aᵢ): weight and scale folded into the up factor (full space: only their
        dense product matters). Methods that depend on the split take canonical factors."""
        up, down = self.module.factors(ctx.dtype, ctx.device)
        return up * (self.weight * self.module.scale), down


@dataclass
class ModuleContext:
    key: str
    shape: tuple[int, ...]
    rank: int | None
    energy: float | None
    device: torch.device
    seed: int  # derived from the run's seed and the module key: same inputs → same result
    stats: dict[str, float] = field(default_factory=dict)  # what the method measured
    shared: Any = None  # what the method's prepare pass computed over all modules
    dtype: torch.dtype = torch.float32  # the math's dtype
    out_dtype: torch.dtype = torch.float32  # the dtype the result is written in (its precision)


MethodFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    summary: str
    params: tuple[Param, ...] = ()
    uses_rank: bool = False  # --rank / --energy apply
    # Optional pass over every module before merging (e.g. a top-k threshold over all layers):
    # prepare(iterable of (terms, ctx), params) → the value each ctx.shared receives.
    prepare: Callable | None = None
    check: Callable[[dict], None] | None = None  # validates the resolved parameters once
    # Learned methods fit on the base pipeline first: learn(inputs, [(terms, ctx)…], params,
    # seed=, progress=) → the value each ctx.shared receives (instead of prepare).
    learn: Callable | None = None

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise UsageError(f"method {self.name!r} has no parameter {unknown[0]!r} (parameters: {allowed})")
        resolved = {name: p.coerce(given.get(name, p.default)) for name, p in known.items()}
        if self.check:
            self.check(resolved)
        return resolved


METHODS: dict[str, Method] = {}


def register(name: str, summary: str, params: tuple[Param, ...] = (), uses_rank: bool = False,
             prepare: Callable | None = None, check: Callable | None = None, learn: Callable | None = None):
    def decorate(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, summary, params, uses_rank, prepare, check, learn)
        return fn

    return decorate


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}") from None
