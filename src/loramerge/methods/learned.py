"""Learned merges: coefficients fitted on the base pipeline, written as a plain LoRA.

- ``ziplora`` (ZipLoRA, Shah et al. 2023): per module, a merger vector mᵢ for each LoRA with one
  entry per column of ΔW (per input feature), ΔW = Σᵢ wᵢ·ΔWᵢ·diag(mᵢ), mᵢ starting at 1. Trained
  so the merged model reproduces each LoRA's output on that LoRA's own prompts, with a penalty
  λ·Σ over modules of |cos(mᵢ, mⱼ)| (the overlap of the merger vectors of two LoRAs).
- ``soups_cat`` (LoRA Soups' CAT, Prabhakar et al. 2024): per module a learned scalar for each
  LoRA's block of the concatenation, ΔW = Σᵢ αᵢ·wᵢ·ΔWᵢ, same objective, no penalty.

The data needs no images: the base pipeline generates with each LoRA alone (applied unfused by
loramerge.compose) on its prompts, and every denoiser and text-encoder call is recorded (inputs
and outputs). A training step runs the merged model on one recorded denoiser call of every
LoRA; the loss of LoRA i is ‖f_merged(x) − f_i(x)‖² / ‖f_i(x) − f_base(x)‖² (0: reproduces the
LoRA, 1: as far from it as the base), averaged over LoRAs, and the same for the text encoders.
Prompts: ``prompts`` templates ("|"-separated; ``{trigger}`` is replaced by the LoRA's trigger
phrase, else the phrase is appended after a comma), by default the trigger phrase alone, read
from ``modelspec.trigger_phrase``. The result has rank Σrᵢ per module (factors concatenated, the
coefficients folded into the down factors): an ordinary LoRA every client loads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..runtime import tensors_in
from .registry import ModuleContext, Param, Term, register

LEARNED_PARAMS = (
    Param("base", str, "", "the base diffusers pipeline folder the LoRAs belong to (required; --base)"),
    Param("prompts", str, "", "'|'-separated prompt templates with {trigger} (default: each LoRA's trigger phrase)"),
    Param("steps", int, 100, "optimisation steps", low=1),
    Param("lr", float, 0.01, "Adam learning rate", low=0.0),
    Param("sample_steps", int, 10, "denoising steps of the recorded generations", low=1),
    Param("guidance", float, 5.0, "guidance scale of the recorded generations", low=0.0),
    Param("batch", int, 4, "recorded denoiser calls per LoRA in each step", low=1),
)


def _check_base(params: dict) -> None:
    if not params.get("base"):
        raise UsageError("this method learns its merge on the base pipeline: give --base PIPE_FOLDER "
                         "(a diffusers folder; -p base=… in a recipe)")
    if not os.path.isdir(params["base"]):
        raise UsageError(f"--base {params['base']}: not a diffusers pipeline folder")


# ------------------------------------------------------------------------------------ training


class _Trainable:
    """Forward hooks adding Σᵢ upᵢ(downᵢ·cᵢ) to each targeted layer, cᵢ trainable."""

    def __init__(self, pipe, per_module: list[tuple[str, list[Term]]], kind: str):
        from ..runtime import _find_module

        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.handles = []
        self.text_keys, self.denoiser_keys = [], []
        for key, terms in per_module:
            first = terms[0].module
            layer = _find_module(pipe, first.component, first.name)
            if layer is None:
                raise UsageError(f"the base pipeline has no module {key}")
            factors = []
            for t in terms:
                up, down = t.module.factors(torch.float32)
                up = up * (t.weight * t.module.scale)
                size = down.shape[1] if kind == "ziplora" else 1
                factors.append((up, down, torch.nn.Parameter(torch.ones(size))))
            self.params[key] = [p for _, _, p in factors]
            (self.denoiser_keys if first.component in ("unet", "transformer") else self.text_keys).append(key)
            self.handles.append(layer.register_forward_hook(self._hook(layer, factors)))

    @staticmethod
    def _hook(layer, factors):
        conv = isinstance(layer, torch.nn.Conv2d)

        def hook(module, args, output):
            x = args[0]
            for up, down, c in factors:
                d = down * c if c.numel() > 1 else down * c[0]
                if conv:
                    h = F.conv2d(x, d.reshape(d.shape[0], *layer.weight.shape[1:]), None, layer.stride, layer.padding,
                                 layer.dilation)
                    output = output + F.conv2d(h, up.reshape(*up.shape, 1, 1))
                else:
                    output = output + F.linear(F.linear(x, d), up)
            return output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Recorder:
    """Records (args, kwargs, output) of every call of some modules."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.calls: dict[str, list] = {name: [] for name in modules}
        self._pending: dict[str, tuple] = {}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def _pre(self, name):
        def pre(module, args, kwargs):
            self._pending[name] = (_detach(args), _detach(kwargs))
        return pre

    def _post(self, name):
        def post(module, args, kwargs, output):
            a, k = self._pending.pop(name)
            self.calls[name].append((a, k, [t.detach().clone() for t in tensors_in(output)]))
        return post

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def lora_prompts(lora, templates: list[str], name: str) -> list[str]:
    phrase = lora.metadata.get("modelspec.trigger_phrase", "")
    if not templates:
        if not phrase:
            raise UsageError(f"no prompts for LoRA {name}: its file has no modelspec.trigger_phrase; give --prompts")
        return [phrase]
    out = []
    for t in templates:
        if "{trigger}" in t:
            out.append(t.replace("{trigger}", phrase))
        else:
            out.append(f"{t}, {phrase}" if phrase else t)
    return out


def load_base(path: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)
            model.eval()
    return pipe


def record(pipe, lora, prompts: list[str], params: dict, seed: int, components: list[str]):
    """Generate with one LoRA (unfused) and with none on the same inputs; returns per component
    the recorded calls: (args, kwargs, LoRA output tensors, base output tensors)."""
    from ..composer import compose

    modules = {c: getattr(pipe, c) for c in components}
    recorder = _Recorder(modules)
    try:
        with compose(pipe, {"lora": lora}, method="mix"), torch.no_grad():
            pipe(prompts, num_inference_steps=params["sample_steps"], guidance_scale=params["guidance"],
                 generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        recorder.remove()
    out = {}
    with torch.no_grad():
        for c, calls in recorder.calls.items():
            out[c] = [(a, k, y, [t.detach() for t in tensors_in(modules[c](*a, **k))]) for a, k, y in calls]
    return out


def _effect(call) -> float:
    """‖f_lora − f_base‖² of a recorded call: the size of the LoRA's effect there."""
    _, _, target, base = call
    return float(sum(((t - b) ** 2).sum() for t, b in zip(target, base)))


def _relative_error(model, call, scale: float) -> torch.Tensor:
    args, kwargs, target, _ = call
    got = tensors_in(model(*args, **kwargs))
    return sum(((g - t) ** 2).sum() for g, t in zip(got, target)) / scale


class Learner:
    """The recorded data and the merged model with trainable coefficients, for one learned merge."""

    def __init__(self, kind: str, inputs, items: list[tuple[list[Term], ModuleContext]], params: dict, seed: int = 0):
        _check_base(params)
        self.kind, self.params, self.seed = kind, params, seed
        torch.manual_seed(seed)
        self.pipe = load_base(params["base"])
        templates = [t.strip() for t in params["prompts"].split("|") if t.strip()]
        self.components = sorted({t.module.component for terms, _ in items for t in terms})
        names = [str(lora.path.stem) if lora.path else f"input {i}" for i, lora in enumerate(inputs)]
        self.recorded = [record(self.pipe, lora, lora_prompts(lora, templates, names[i]), params, seed + i,
                                self.components) for i, lora in enumerate(inputs)]
        # each call's error is relative to the LoRA's effect on that call; where a LoRA has no
        # module in a component (its effect there is 0), to the mean effect of the others there
        self.scales = []
        for calls in self.recorded:
            self.scales.append({c: [_effect(call) for call in cs] for c, cs in calls.items()})
        for c in self.components:
            effects = [e for sc in self.scales for e in sc.get(c, []) if e > 0]
            fallback = sum(effects) / len(effects) if effects else 1.0
            for sc in self.scales:
                sc[c] = [e if e > 0 else fallback for e in sc.get(c, [])]
        self.trainable = _Trainable(self.pipe, [(ctx.key, terms) for terms, ctx in items], kind)
        self.models = {c: getattr(self.pipe, c) for c in self.components}

    def coefficients(self) -> dict[str, list[torch.Tensor]]:
        return {key: [p.detach().clone() for p in ps] for key, ps in self.trainable.params.items()}

    def loss(self, pick=None) -> torch.Tensor:
        """Mean relative error over LoRAs and components; ``pick(n)`` chooses call indices (all
        calls when None)."""
        losses = []
        for calls, scales in zip(self.recorded, self.scales):
            for component, model in self.models.items():
                chosen = calls.get(component) or []
                indices = range(len(chosen)) if pick is None else pick(len(chosen)) if chosen else []
                for j in indices:
                    losses.append(_relative_error(model, chosen[j], scales[component][j]) / len(indices))
        return sum(losses) / max(1, len(self.recorded) * len(self.models))

    @torch.no_grad()
    def objective(self) -> float:
        return float(self.loss())

    @torch.no_grad()
    def errors(self) -> list[float]:
        """Per LoRA: the mean relative error of the merged model on all its recorded calls."""
        out = []
        for calls, scales in zip(self.recorded, self.scales):
            values = [float(_relative_error(self.models[c], call, scale))
                      for c in self.components for call, scale in zip(calls.get(c, []), scales[c])]
            out.append(sum(values) / max(1, len(values)))
        return out

    def fit(self, progress=None, log: list | None = None) -> dict[str, list[torch.Tensor]]:
        params = self.params
        optimiser = torch.optim.Adam([p for ps in self.trainable.params.values() for p in ps], lr=params["lr"])
        order = torch.Generator().manual_seed(self.seed)
        lam = params.get("similarity", 0.0) if self.kind == "ziplora" else 0.0
        batch = params.get("batch", 4)

        def pick(n):
            return torch.randperm(n, generator=order)[:batch].tolist()

        for step in range(params["steps"]):
            optimiser.zero_grad()
            loss = self.loss(pick)
            overlap = _overlap(self.trainable.params) if lam else torch.zeros(())
            (loss + lam * overlap).backward()
            optimiser.step()
            if log is not None:
                log.append({"step": step, "loss": float(loss.detach()), "overlap": float(overlap.detach())})
            if progress:
                progress(step + 1, params["steps"], "training")
        return self.coefficients()

    def close(self) -> None:
        self.trainable.remove()


def learn(kind: str, inputs, items: list[tuple[list[Term], ModuleContext]], params: dict, seed: int = 0,
          progress=None) -> dict[str, list[torch.Tensor]]:
    """Fit the coefficients; returns {module key: [coefficient tensor per term]} (ctx.shared)."""
    learner = Learner(kind, inputs, items, params, seed)
    try:
        return learner.fit(progress)
    finally:
        learner.close()


def _overlap(params: dict[str, list[torch.nn.Parameter]]) -> torch.Tensor:
    terms = []
    for ps in params.values():
        for i in range(len(ps)):
            for j in range(i + 1, len(ps)):
                terms.append(F.cosine_similarity(ps[i], ps[j], dim=0).abs())
    return torch.stack(terms).sum() if terms else torch.zeros(())


# ------------------------------------------------------------------------------------ methods


def _apply(terms: list[Term], ctx: ModuleContext):
    coefficients = ctx.shared[ctx.key]
    ups, downs = [], []
    for t, c in zip(terms, coefficients):
        up, down = t.module.factors(ctx.dtype, ctx.device)
        ups.append(up * (t.weight * t.module.scale))
        c = c.to(ctx.device, ctx.dtype)
        downs.append(down * (c if c.numel() > 1 else c[0]))
        ctx.stats[f"coefficient_mean_{t.index}"] = float(c.mean())
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


@register("ziplora", "ZipLoRA (Shah et al. 2023): learned per-column merger vectors, trained on the base pipeline",
          params=LEARNED_PARAMS + (Param("similarity", float, 0.01, "λ: weight of the |cos(mᵢ, mⱼ)| penalty", low=0.0),),
          check=_check_base, learn=lambda *a, **k: learn("ziplora", *a, **k))
def ziplora(terms, ctx, **params):
    return _apply(terms, ctx)


@register("soups_cat", "LoRA Soups CAT (Prabhakar et al. 2024): learned per-module weights of the concatenation",
          params=LEARNED_PARAMS, check=_check_base, learn=lambda *a, **k: learn("soups_cat", *a, **k))
def soups_cat(terms, ctx, **params):
    return _apply(terms, ctx)
