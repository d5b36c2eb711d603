"""Inference-time composition of LoRAs in a diffusers pipeline (UNet or transformer denoiser).

    with loramerge.compose(pipe, {"bold": "bold.safetensors", "slanted": lora}, method="switch", tau=2):
        image = pipe("a handwritten seven, bold, slanted").images[0]
    # or: handle = loramerge.compose(...); ...; handle.remove()

The LoRAs are applied *unfused*: a forward hook on every targeted Linear/Conv layer adds
Σᵢ cᵢ·upᵢ(downᵢ(x)) (scale alpha/r folded into up) to the layer's own output, so changing which
LoRA acts, and how strongly, between steps or layers only changes the coefficients cᵢ. No
weight is ever written: :meth:`Composition.remove` takes the hooks and wrappers off and the
pipeline computes exactly what it computed before.

Methods (``method=``):

- ``mix``: every LoRA at its weight, at every step (the unfused live mix).
- ``schedule``: a weight per LoRA as a function of the step, its progress or sigma, and block
  weights per step ("subject early, style late"); see :func:`schedule_value`.
- ``switch`` (LoRA Switch, Zhong et al. 2024): one LoRA active at a time, the next one every
  ``tau`` steps: LoRA ``(step // tau) mod n`` at step ``step``.
- ``composite`` (LoRA Composite, Zhong et al. 2024): at every step the denoiser runs once per
  LoRA (only that LoRA active) and the outputs are averaged; since classifier-free guidance is
  linear, the pipeline's guidance then equals the average of the per-LoRA guided predictions.
- ``klora`` (K-LoRA, Ouyang et al. 2025), two LoRAs, content first: per layer and call, the
  sum of the k = r₁·r₂ largest |ΔW| entries of each LoRA is compared, the content's divided by
  γ (the mean over layers of Σ|ΔW₁|/Σ|ΔW₂|, ratios ≥ 3× the mean dropped), the style's
  multiplied by s = alpha·p + beta (pattern ``"s*"``: s mod alpha), p the fraction of the
  generation's layer calls done; the larger one's LoRA alone is applied.

``prompts="own"`` (switch and composite): each LoRA's pass sees the prompt without the other
LoRAs' trigger phrases, encoded with only its own text-encoder modules — guidance-level
composition of the LoRAs as each was trained, rather than one prompt none was trained on.
Text encoders otherwise get the static mix (each LoRA at its weight; a schedule's value at
step 0), since they run once before the denoising loop.

The current step comes from the pipeline's scheduler (its ``set_timesteps`` and ``step`` are
wrapped): step = begin index + the number of ``scheduler.step`` calls since ``set_timesteps``,
counted over ``scheduler.timesteps`` (a second-order scheduler counts its half steps).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .blocks import BlockWeights, parse_block_weights
from .errors import LoraMergeError, ShapeMismatchError, UsageError
from .lora import LoRA, LoraModule
from .io import load
from .runtime import _find_module, tensors_in

COMPOSE_METHODS = ("mix", "schedule", "switch", "composite", "klora")

DENOISERS = ("unet", "transformer")
_PROMPT_ARGS = ("prompt", "prompt_2", "prompt_3")


class CompositionError(LoraMergeError):
    """A composition that cannot run on this pipeline (no denoiser, scheduler replaced, …)."""


@dataclass(frozen=True)
class StepInfo:
    """Where the denoising loop is: what schedules and rules are functions of."""

    step: int  # index into scheduler.timesteps
    num_steps: int
    timestep: float | None = None
    sigma: float | None = None

    @property
    def progress(self) -> float:
        """step / num_steps: 0 at the first step, (n-1)/n at the last."""
        return self.step / max(1, self.num_steps)


# ------------------------------------------------------------------------------------ schedules


def _interpolate(points, x: float) -> float:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise UsageError("schedule points must be given in increasing order of their first value")
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    j = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def schedule_value(spec, info: StepInfo) -> float:
    """A LoRA's weight at a step. ``spec`` is a number; a callable ``f(StepInfo)``;
    ``{"steps": [w₀, w₁, …]}`` (per step, the last value held); ``{"progress": [[p, w], …]}``
    (piecewise linear in step/num_steps); or ``{"sigma": [[σ, w], …]}`` (piecewise linear in
    the scheduler's sigma, points in increasing σ)."""
    if callable(spec):
        return float(spec(info))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, value), = spec.items()
        if kind == "steps":
            values = [float(v) for v in value]
            return values[min(info.step, len(values) - 1)] if values else 0.0
        if kind == "progress":
            return _interpolate(value, info.progress)
        if kind == "sigma":
            if info.sigma is None:
                raise CompositionError("a sigma schedule needs a scheduler with sigmas or alphas_cumprod")
            return _interpolate(value, info.sigma)
    raise UsageError(f"cannot read the weight schedule {spec!r}: give a number, a function of the step, "
                     "{'steps': [...]}, {'progress': [[p, w], ...]} or {'sigma': [[s, w], ...]}")


def _check_schedule(spec) -> None:
    schedule_value(spec, StepInfo(0, 1, sigma=1.0))


# ------------------------------------------------------------------------------------ layers


@dataclass
class _Term:
    index: int  # which LoRA
    module: LoraModule
    up: torch.Tensor  # (out, r) with alpha/r folded in; conv: (out, r, 1, 1)
    down: torch.Tensor  # (r, in) ; conv: (r, in, kh, kw)
    bias: torch.Tensor | None


class _Layer:
    """One pipeline layer with the LoRA terms on it, added to its output by a forward hook."""

    def __init__(self, key: str, layer: torch.nn.Module, denoiser: bool):
        self.key = key
        self.layer = layer
        self.denoiser = denoiser
        self.terms: list[_Term] = []
        self.handle = None
        self.klora: tuple[float, float] | None = None  # (top-k sum content, top-k sum style)

    def add(self, index: int, module: LoraModule) -> None:
        layer = self.layer
        weight = layer.weight
        up, down = module.factors(torch.float32, weight.device)
        up = up * module.scale
        if isinstance(layer, torch.nn.Conv2d):
            if layer.groups != 1:
                raise CompositionError(f"module {module.key}: grouped convolutions are not supported")
            down = down.reshape(module.rank, *weight.shape[1:])
            up = up.reshape(weight.shape[0], module.rank, 1, 1)
        elif not isinstance(layer, torch.nn.Linear):
            raise CompositionError(f"module {module.key} is a {type(layer).__name__}; compose hooks Linear and Conv2d layers")
        bias = module.bias_delta()
        self.terms.append(_Term(index, module, up.to(weight.dtype), down.to(weight.dtype),
                                None if bias is None else bias.to(weight.device, weight.dtype)))

    def delta(self, x: torch.Tensor, term: _Term) -> torch.Tensor:
        up, down = term.up.to(x.dtype), term.down.to(x.dtype)
        if isinstance(self.layer, torch.nn.Conv2d):
            c = self.layer
            h = F.conv2d(x, down, None, c.stride, c.padding, c.dilation)
            out = F.conv2d(h, up)
            return out if term.bias is None else out + term.bias.to(x.dtype).view(1, -1, 1, 1)
        out = F.linear(F.linear(x, down), up)
        return out if term.bias is None else out + term.bias.to(x.dtype)


# ------------------------------------------------------------------------------------ composition


class Composition:
    """The handle :func:`compose` returns: the hooks and wrappers it installed, and what it did.

    ``trace`` (with ``record=True``) lists ``(step, layer key, {lora: coefficient})`` for every
    denoiser layer call whose coefficients are not all zero, and ``("encode", key, …)`` entries
    for text-encoder calls."""

    def __init__(self, pipe, loras: Mapping[str, LoRA | str | os.PathLike], method: str = "mix",
                 weights: Mapping[str, Any] | None = None, block_weights: Mapping[str, Any] | None = None,
                 tau: int = 1, prompts: str = "shared", triggers: Mapping[str, str] | None = None,
                 alpha: float = 1.5, beta: float | None = None, pattern: str = "s*", record: bool = False):
        if method not in COMPOSE_METHODS:
            raise UsageError(f"unknown composition method {method!r}; available: {', '.join(COMPOSE_METHODS)}")
        if not loras:
            raise UsageError("compose needs at least one LoRA")
        if prompts not in ("shared", "own"):
            raise UsageError(f"prompts must be 'shared' or 'own', got {prompts!r}")
        if prompts == "own" and method not in ("switch", "composite"):
            raise UsageError("prompts='own' applies to the switch and composite methods (one LoRA per pass)")
        if int(tau) < 1:
            raise UsageError(f"tau must be at least 1, got {tau}")
        if pattern not in ("s", "s*"):
            raise UsageError(f"K-LoRA pattern must be 's' or 's*', got {pattern!r}")
        self.pipe = pipe
        self.method = method
        self.names = list(loras)
        self.loras = [x if isinstance(x, LoRA) else load(x) for x in loras.values()]
        if method == "klora" and len(self.loras) != 2:
            raise UsageError(f"K-LoRA composes two LoRAs (content, then style); got {len(self.loras)}")
        weights = dict(weights or {})
        unknown = sorted((set(weights) | set(block_weights or {})) - set(self.names))
        if unknown:
            raise UsageError(f"no LoRA named {unknown[0]!r} in this composition (LoRAs: {', '.join(self.names)})")
        if method != "schedule":
            for name, w in weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool):
                    raise UsageError(f"weight of {name!r} must be a number for method {method!r} "
                                     "(weights that change per step need method='schedule')")
        self.weights = [weights.get(n, 1.0) for n in self.names]
        for w in self.weights:
            _check_schedule(w)
        self.block_weights = [self._parse_blocks((block_weights or {}).get(n), lora)
                              for n, lora in zip(self.names, self.loras)]
        self.tau = int(tau)
        self.prompts = prompts
        self.klora_alpha = float(alpha)
        self.klora_beta = float(alpha * 0.85 if pattern == "s*" else 0.5) if beta is None else float(beta)
        self.klora_pattern = pattern
        self.record = record
        self.trace: list[tuple] = []
        self.unmatched_rows = 0  # denoiser inputs own-prompt passes could not map (see _substitute)

        self.denoiser_name = next((c for c in DENOISERS if getattr(pipe, c, None) is not None), None)
        if self.denoiser_name is None:
            raise CompositionError("the pipeline has neither a unet nor a transformer to compose LoRAs in")
        self.denoiser = getattr(pipe, self.denoiser_name)
        self.triggers = self._triggers(triggers or {}) if prompts == "own" else {}

        # state the hooks read
        self.branch: int | None = None  # the LoRA a single-LoRA pass runs (switch, composite)
        self.info = StepInfo(0, 1)
        self._count = 0  # scheduler.step calls since set_timesteps
        self._calls = 0  # K-LoRA layer calls in the current denoiser forward
        self._rows: dict[tuple, list[torch.Tensor]] = {}
        self._subst_cache: dict[tuple, list] = {}
        self._installed: list[Callable[[], None]] = []

        self.layers: dict[str, _Layer] = {}
        for index, lora in enumerate(self.loras):
            for module in lora:
                self._add(index, module)
        self._klora_layers = [layer for layer in self.layers.values()
                              if layer.denoiser and len({t.index for t in layer.terms}) == 2]
        if method == "klora":
            self._prepare_klora()
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    # ---------------------------------------------------------------- set-up

    def _parse_blocks(self, spec, lora: LoRA):
        if spec is None:
            return None
        if callable(spec) or (isinstance(spec, Mapping) and set(spec) == {"progress"}):
            if self.method != "schedule":
                raise UsageError("block weights that change per step need method='schedule'")
            if not callable(spec):
                points = [(float(p), parse_block_weights(s, lora.arch)) for p, s in spec["progress"]]
                return lambda info: next(s for p, s in reversed(points) if info.progress >= p or p == points[0][0])
            return lambda info: parse_block_weights(spec(info), lora.arch)
        return parse_block_weights(spec, lora.arch)

    def _triggers(self, given: Mapping[str, str]) -> dict[int, str]:
        out = {}
        for i, (name, lora) in enumerate(zip(self.names, self.loras)):
            phrase = given.get(name) or lora.metadata.get("modelspec.trigger_phrase")
            if not phrase:
                raise UsageError(f"prompts='own' needs the trigger phrase of LoRA {name!r}: its file has no "
                                 "modelspec.trigger_phrase; pass triggers={...}")
            out[i] = str(phrase)
        return out

    def _add(self, index: int, module: LoraModule) -> None:
        layer = _find_module(self.pipe, module.component, module.name)
        name = self.names[index]
        if layer is None or not hasattr(layer, "weight"):
            raise LoraMergeError(f"the pipeline has no module {module.key} (LoRA {name!r})", self.loras[index].path)
        w = layer.weight
        if (w.shape[0], w[0].numel()) != (module.out_features, module.in_features):
            raise ShapeMismatchError(f"module {module.key} is {tuple(module.shape)} in LoRA {name!r} but "
                                     f"{tuple(w.shape)} in the pipeline", self.loras[index].path)
        entry = self.layers.get(module.key)
        if entry is None:
            entry = self.layers[module.key] = _Layer(module.key, layer, module.component in DENOISERS)
        entry.add(index, module)

    def _prepare_klora(self) -> None:
        """Per layer the top-k |ΔW| sums (k = r₁·r₂), and γ over the layers both LoRAs touch."""
        ratios = []
        for layer in self._klora_layers:
            first, second = (next(t for t in layer.terms if t.index == i) for i in (0, 1))
            sums = []
            for term, other in ((first, second), (second, first)):
                delta = term.module.delta().abs().flatten()
                k = min(delta.numel(), term.module.rank * other.module.rank)
                sums.append((float(torch.topk(delta, k).values.sum()), float(delta.sum())))
            layer.klora = (sums[0][0], sums[1][0])
            ratios.append(sums[0][1] / sums[1][1] if sums[1][1] > 0 else math.inf)
        self.klora_gamma = klora_gamma(ratios) if ratios else 1.0

    # ---------------------------------------------------------------- install / remove

    def _install(self) -> None:
        for layer in self.layers.values():
            layer.handle = layer.layer.register_forward_hook(self._hook(layer))
            self._installed.append(layer.handle.remove)
        scheduler = self.pipe.scheduler
        self.scheduler = scheduler
        for attr, make in (("set_timesteps", self._wrap_set_timesteps), ("step", self._wrap_step)):
            self._installed.append(_replace_attribute(scheduler, attr, make(getattr(scheduler, attr))))
        self._sync_steps()
        self._installed.append(_replace_attribute(self.denoiser, "forward", self._wrap_forward(self.denoiser.forward)))
        if self.prompts == "own":
            encode = getattr(self.pipe, "encode_prompt", None)
            if encode is None:
                raise CompositionError("prompts='own' needs a pipeline with encode_prompt")
            self._installed.append(_replace_attribute(self.pipe, "encode_prompt", self._wrap_encode(encode)))

    def remove(self) -> None:
        """Take every hook and wrapper off: the pipeline computes exactly what it did before."""
        while self._installed:
            self._installed.pop()()
        self._rows.clear()
        self._subst_cache.clear()

    def __enter__(self) -> "Composition":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---------------------------------------------------------------- steps

    def _sync_steps(self) -> None:
        s = self.scheduler
        timesteps = getattr(s, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 1
        step = (getattr(s, "begin_index", None) or 0) + self._count
        t = float(timesteps[min(step, n - 1)]) if timesteps is not None and n else None
        self.info = StepInfo(step, max(n, 1), t, self._sigma(step, t))

    def _sigma(self, step: int, t: float | None) -> float | None:
        s = self.scheduler
        sigmas = getattr(s, "sigmas", None)
        if sigmas is not None and len(sigmas) > step:
            return float(sigmas[step])
        alphas = getattr(s, "alphas_cumprod", None)
        if alphas is not None and t is not None:
            a = float(alphas[int(round(t))])
            return math.sqrt((1 - a) / a)
        return None

    def _wrap_set_timesteps(self, original):
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            self._count = 0
            self._sync_steps()
            return out
        return set_timesteps

    def _wrap_step(self, original):
        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self._count += 1
            self._sync_steps()
            return out
        return step

    # ---------------------------------------------------------------- coefficients

    def _weight(self, index: int, term: _Term, info: StepInfo) -> float:
        w = schedule_value(self.weights[index], info)
        blocks = self.block_weights[index]
        if blocks is not None:
            if callable(blocks) and not isinstance(blocks, BlockWeights):
                blocks = blocks(info)
            w *= blocks.weight_for(term.module)
        return w

    def coefficients(self, layer: _Layer) -> list[float]:
        """The coefficient of each of the layer's terms for the call happening now."""
        info = self.info
        if not layer.denoiser:
            first = StepInfo(0, info.num_steps, None, None)
            return [self._weight(t.index, t, first) if self.branch is None or t.index == self.branch else 0.0
                    for t in layer.terms]
        if self.method in ("mix", "schedule"):
            return [self._weight(t.index, t, info) for t in layer.terms]
        if self.method in ("switch", "composite"):
            active = self.branch if self.branch is not None else switch_active(info.step, self.tau, len(self.loras))
            return [self._weight(t.index, t, info) if t.index == active else 0.0 for t in layer.terms]
        # klora
        if layer.klora is None:  # only one LoRA touches this layer: it acts alone
            return [self._weight(t.index, t, info) for t in layer.terms]
        self._calls += 1
        total = len(self._klora_layers) * info.num_steps
        progress = (info.step * len(self._klora_layers) + self._calls) / max(1, total)
        chosen = klora_choice(layer.klora[0], layer.klora[1], self.klora_gamma, progress,
                              self.klora_alpha, self.klora_beta, self.klora_pattern)
        return [self._weight(t.index, t, info) if t.index == chosen else 0.0 for t in layer.terms]

    def _hook(self, layer: _Layer):
        def hook(module, args, output):
            coefficients = self.coefficients(layer)
            if self.record and any(coefficients):
                where = self.info.step if layer.denoiser else "encode"
                self.trace.append((where, layer.key, {self.names[t.index]: c for t, c in zip(layer.terms, coefficients)}))
            x = args[0]
            for term, c in zip(layer.terms, coefficients):
                if c:
                    output = output + c * layer.delta(x, term)
            return output
        return hook

    # ---------------------------------------------------------------- denoiser passes

    def _wrap_forward(self, original):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self.pipe.scheduler is not self.scheduler:
                raise CompositionError("the pipeline's scheduler was replaced after compose(); remove the "
                                       "composition and compose again")
            self._calls = 0
            if self.method == "composite":
                outputs = [self._branch_pass(original, i, args, kwargs) for i in range(len(self.loras))]
                return _average_outputs(outputs)
            if self.method == "switch" and self.prompts == "own":
                return self._branch_pass(original, switch_active(self.info.step, self.tau, len(self.loras)), args, kwargs)
            return original(*args, **kwargs)
        return forward

    def _branch_pass(self, original, index: int, args, kwargs):
        self.branch = index
        self._calls = 0
        try:
            if self.prompts == "own":
                args, kwargs = self._substitute((args, kwargs), index)
            return original(*args, **kwargs)
        finally:
            self.branch = None

    # ---------------------------------------------------------------- own prompts

    def _strip_triggers(self, prompt, keep: int):
        if prompt is None:
            return None
        if isinstance(prompt, (list, tuple)):
            return [self._strip_triggers(p, keep) for p in prompt]
        text = str(prompt)
        for i, phrase in self.triggers.items():
            if i != keep and phrase != self.triggers[keep]:
                text = strip_phrase(text, phrase)
        return text

    def _wrap_encode(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            self._subst_cache.clear()  # a new generation: its tensors are new
            canonical = original(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            if all(bound.arguments.get(a) is None for a in _PROMPT_ARGS):
                return canonical  # embeddings given directly: nothing to re-encode per LoRA
            branches = []
            for i in range(len(self.loras)):
                changed = signature.bind_partial(*args, **kwargs)
                for name in _PROMPT_ARGS:
                    if changed.arguments.get(name) is not None:
                        changed.arguments[name] = self._strip_triggers(changed.arguments[name], i)
                self.branch = i
                try:
                    branches.append(original(*changed.args, **changed.kwargs))
                finally:
                    self.branch = None
            self._register_rows(canonical, branches)
            return canonical
        return encode_prompt

    def _register_rows(self, canonical, branches) -> None:
        base = tensors_in(canonical)
        per_branch = [tensors_in(b) for b in branches]
        for k, tensor in enumerate(base):
            if tensor.dim() < 1:
                continue
            for row in range(tensor.shape[0]):
                key = _row_key(tensor[row])
                self._rows[key] = [tensors[k][row] for tensors in per_branch]

    def _substitute(self, value, index: int):
        """Denoiser inputs with every row that came from encode_prompt replaced by the same row
        of LoRA ``index``'s own encoding (matched by the row's exact bytes)."""
        if isinstance(value, torch.Tensor):
            if value.dim() < 2 or not self._rows:
                return value
            cache_key = (id(value), value._version)
            entry = self._subst_cache.get(cache_key)
            # the entry holds the tensor itself, so its id cannot be reused while cached
            cached = entry[1] if entry is not None and entry[0] is value else None
            if cached is None:
                rows = [self._rows.get(_row_key(value[r])) for r in range(value.shape[0])]
                if not any(rows):
                    cached = [value] * len(self.loras)
                else:
                    self.unmatched_rows += sum(r is None for r in rows)
                    cached = [torch.stack([value[r] if rows[r] is None else rows[r][i].to(value.dtype)
                                           for r in range(value.shape[0])]) for i in range(len(self.loras))]
                self._subst_cache[cache_key] = (value, cached)
            return cached[index]
        if isinstance(value, tuple):
            return tuple(self._substitute(v, index) for v in value)
        if isinstance(value, list):
            return [self._substitute(v, index) for v in value]
        if isinstance(value, dict):
            return {k: self._substitute(v, index) for k, v in value.items()}
        return value


# ------------------------------------------------------------------------------------ rules


def switch_active(step: int, tau: int, n: int) -> int:
    """LoRA Switch: the LoRA active at ``step`` (0-based), switching every ``tau`` steps."""
    return (step // tau) % n


def klora_gamma(ratios: list[float]) -> float:
    """K-LoRA's γ: the mean of the per-layer ratios Σ|ΔW₁|/Σ|ΔW₂|, then the mean again without
    the ratios at or above 3× that mean."""
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else math.inf


def klora_choice(topk_first: float, topk_second: float, gamma: float, progress: float,
                 alpha: float, beta: float, pattern: str) -> int:
    """0 (the first, content LoRA) or 1 (the second, style LoRA) for one layer call."""
    scale = alpha * progress + beta
    if pattern == "s*":
        scale = scale % alpha
    second = topk_second * scale
    if second == 0:
        return 0
    return 0 if (topk_first / gamma) / second > 1 else 1


def strip_phrase(text: str, phrase: str) -> str:
    """``text`` without ``phrase`` (whole words) and the comma that joined it."""
    pattern = r"\s*,?\s*(?<![\w])" + re.escape(phrase) + r"(?![\w])"
    out = re.sub(pattern, "", text)
    return re.sub(r"^\s*,\s*", "", out).strip()


def _replace_attribute(obj, name: str, value) -> Callable[[], None]:
    """Set an instance attribute; the returned function puts back exactly what was there (an
    instance attribute someone else set, e.g. accelerate's offload hooks, or none)."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)

    def restore():
        if had:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)
    return restore


def _row_key(row: torch.Tensor) -> tuple:
    data = row.detach().to("cpu").contiguous()
    return (tuple(data.shape), str(data.dtype), hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(),
                                                                 digest_size=16).hexdigest())


def _average_outputs(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return sum(outputs) / len(outputs)
    if isinstance(first, tuple):
        return (sum(o[0] for o in outputs) / len(outputs),) + tuple(first[1:])
    if hasattr(first, "sample"):  # diffusers BaseOutput
        first.sample = sum(o.sample for o in outputs) / len(outputs)
        return first
    raise CompositionError(f"cannot average denoiser outputs of type {type(first).__name__}")


def compose(pipe, loras: Mapping[str, LoRA | str | os.PathLike], method: str = "mix", **params) -> Composition:
    """Compose LoRAs at inference time in ``pipe`` (see the module docstring for the methods);
    returns a handle whose ``remove()`` (or ``with`` exit) restores the pipeline exactly."""
    return Composition(pipe, loras, method, **params)
