"""Live mixing of LoRAs inside a diffusers pipeline, without drift.

    mix = loramerge.attach(pipe, {"ikea": "ikea.safetensors", "feng": merged_lora})
    mix.set_weights({"ikea": 0.7, "feng": 0.8}, block_weights={"feng": "OUTALL"})
    mix.fuse(scale=1.0)      # weights patched in place: W = cast(W₀ + scale·Σ wᵢ·bᵢ·ΔWᵢ)
    mix.set_weights({"ikea": 0.2, "feng": 1.0})   # re-patches only modules whose delta changed
    mix.unfuse()             # the exact original bits, however many switches happened
    mix.detach()

Every patch is computed from the original weight W₀ (kept on the CPU, float32 math, one cast
to the layer's dtype), never from the previous patch, so nothing accumulates. Parameters are
changed in place (same tensors, shapes, dtypes), so a ``torch.compile``'d module keeps its
compiled graph. The cost: one CPU copy of every weight a LoRA touches (:meth:`memory_cost`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .blocks import BlockWeights, parse_block_weights
from .errors import LoraMergeError, ShapeMismatchError, UsageError
from .lora import LoRA, LoraModule
from .formats import archs
from .io import load_all


@dataclass
class _Target:
    param: torch.nn.Parameter
    terms: list[tuple[str, LoraModule, torch.Tensor, torch.Tensor]]  # (lora name, module, up·s, down)


def _find_module(pipe, component: str, name: str) -> torch.nn.Module | None:
    model = getattr(pipe, component, None)
    if model is None:
        return None
    for candidate in (name, name.removeprefix("text_model.")):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)  # a layer PEFT wrapped keeps its weight below
    return None


def pipeline_arch(pipe) -> str | None:
    """The architecture of a diffusers pipeline object (None when no entry knows it)."""
    configs = {}
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None and hasattr(model, "config"):
            configs[name] = {"_class_name": type(model).__name__, **dict(model.config)}
    found = archs.identify(type(pipe).__name__, configs)
    return found.name if found else None


class LiveMix:
    def __init__(self, pipe, loras: Mapping[str, LoRA | str | os.PathLike]):
        if not loras:
            raise UsageError("attach needs at least one LoRA")
        self.pipe = pipe
        self.loras = dict(zip(loras, load_all(list(loras.values()), prefer=pipeline_arch(pipe))))
        self.weights = {name: 1.0 for name in self.loras}
        self.block_weights: dict[str, BlockWeights | None] = {name: None for name in self.loras}
        self.scale: float | None = None  # None while unfused
        self._targets: dict[str, _Target] = {}
        self._original: dict[str, torch.Tensor] = {}  # CPU copies of touched weights
        self._applied: dict[str, tuple] = {}  # the coefficients each patched weight holds
        for lora_name, lora in self.loras.items():
            for module in lora:
                self._add(lora_name, lora, module)

    def _add(self, lora_name: str, lora: LoRA, module: LoraModule) -> None:
        layer = _find_module(self.pipe, module.component, module.name)
        if layer is None or not hasattr(layer, "weight"):
            raise LoraMergeError(f"the pipeline has no module {module.key} (LoRA {lora_name!r})", lora.path)
        param = layer.weight
        flat = lambda s: (s[0], int(torch.Size(s[1:]).numel()))  # noqa: E731
        if flat(tuple(param.shape)) != flat(module.shape):
            raise ShapeMismatchError(
                f"module {module.key} is {tuple(module.shape)} in LoRA {lora_name!r} but {tuple(param.shape)} "
                "in the pipeline", lora.path)
        up, down = module.factors(torch.float32, param.device)
        target = self._targets.setdefault(module.key, _Target(param, []))
        target.terms.append((lora_name, module, up * module.scale, down))
        if module.bias is not None:  # a bias delta: a rank-1 term (bias as a column) on the bias
            if getattr(layer, "bias", None) is None:
                raise LoraMergeError(f"module {module.key} has a bias delta but the pipeline's layer has no bias "
                                     f"(LoRA {lora_name!r})", lora.path)
            bias = self._targets.setdefault(module.key + ".bias", _Target(layer.bias, []))
            ones = torch.ones(1, 1, device=param.device)
            bias.terms.append((lora_name, module, module.bias_delta().to(param.device).reshape(-1, 1), ones))

    # ------------------------------------------------------------------ public API

    def set_weights(self, weights: Mapping[str, float], block_weights=None) -> None:
        """Set the mix. ``block_weights``: one spec for every LoRA, or {name: spec}. While fused,
        the new mix is patched in at once, touching only modules whose delta changed."""
        unknown = sorted(set(weights) - set(self.loras))
        if unknown:
            raise UsageError(f"no LoRA named {unknown[0]!r} is attached (attached: {', '.join(self.loras)})")
        self.weights.update({k: float(v) for k, v in weights.items()})
        if block_weights is not None:
            per_lora = block_weights if isinstance(block_weights, Mapping) and set(block_weights) <= set(self.loras) \
                and block_weights else {name: block_weights for name in self.loras}
            for name, spec in per_lora.items():
                self.block_weights[name] = None if spec is None else parse_block_weights(spec, self.loras[name].arch)
        if self.scale is not None:
            self._patch(self.scale)

    def fuse(self, scale: float = 1.0) -> int:
        """Patch the current mix into the weights; returns how many weights changed."""
        self.scale = float(scale)
        return self._patch(self.scale)

    def unfuse(self) -> None:
        """Restore every patched weight to its original bits."""
        with torch.no_grad():
            for key in list(self._applied):
                self._targets[key].param.data.copy_(self._original[key])
        self._applied.clear()
        self.scale = None

    def detach(self) -> None:
        """Unfuse and drop every reference to the pipeline and the LoRAs."""
        self.unfuse()
        self._targets.clear()
        self._original.clear()
        self.pipe = None

    def memory_cost(self) -> int:
        """Bytes held to restore exactly: the CPU copies of the weights patched so far."""
        return sum(t.numel() * t.element_size() for t in self._original.values())

    @property
    def fused(self) -> bool:
        return self.scale is not None

    # ------------------------------------------------------------------ patching

    def _coefficients(self, key: str, scale: float) -> tuple[float, ...]:
        coefficients = []
        for lora_name, module, _, _ in self._targets[key].terms:
            block = self.block_weights[lora_name]
            coefficients.append(scale * self.weights[lora_name] * (block.weight_for(module) if block else 1.0))
        return tuple(coefficients)

    def _patch(self, scale: float) -> int:
        changed = 0
        with torch.no_grad():
            for key, target in self._targets.items():
                coefficients = self._coefficients(key, scale)
                if self._applied.get(key) == coefficients:
                    continue
                param = target.param
                if key not in self._original:
                    self._original[key] = param.detach().to("cpu", copy=True)
                original = self._original[key]
                if not any(coefficients):
                    param.data.copy_(original)
                else:
                    _write_patch(param, original, coefficients, target.terms)
                self._applied[key] = coefficients
                changed += 1
        return changed


_BLOCK_ELEMENTS = 1 << 16  # rows × columns patched at once: the block stays in cache


def _write_patch(param: torch.nn.Parameter, original: torch.Tensor, coefficients, terms) -> None:
    """param ← cast(W₀ + Σ cᵢ·upᵢ@downᵢ), float32 math, a block of rows at a time.

    The LoRAs' factors are stacked so each block is one addmm over W₀ (no dense delta per
    LoRA), and the block is cast as it is copied into the parameter: one rounding per entry.
    """
    ups = [c * up for c, (_, _, up, _) in zip(coefficients, terms) if c]
    downs = [down for c, (_, _, _, down) in zip(coefficients, terms) if c]
    U, D = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    rows, cols = U.shape[0], D.shape[1]
    target = param.data.view(rows, cols)
    source = original.view(rows, cols)
    step = max(1, _BLOCK_ELEMENTS // cols)
    for start in range(0, rows, step):
        base = source[start:start + step].to(param.device, torch.float32)
        target[start:start + step].copy_(torch.addmm(base, U[start:start + step], D))


def attach(pipe, loras: Mapping[str, LoRA | str | os.PathLike]) -> LiveMix:
    """Attach LoRAs (files or LoRA objects, e.g. a merge result) to a diffusers pipeline."""
    return LiveMix(pipe, loras)
