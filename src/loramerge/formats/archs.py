"""Architectures as data: what each one calls its parts, how kohya names them, its metadata,
and detection of the architecture of a set of canonical modules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import NotALoraError
from . import keymaps
from .names import UnetLayout, template


@dataclass(frozen=True)
class ArchSpec:
    name: str
    label: str
    denoiser: str  # "unet" or "transformer"
    text_encoders: tuple[str, ...]
    # kohya prefixes this architecture writes, per component
    kohya_prefix: dict[str, str]
    # how kohya names the denoiser's modules: diffusers names, sgm block names, or BFL names
    kohya_naming: str
    # which text-encoder component kohya's third prefix (lora_te3_) stands for
    te3_component: str | None
    ss_base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    resolution: str
    unet_layout: UnetLayout | None = None
    variants: tuple[str, ...] = field(default=())

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


_STABILITY = "https://github.com/Stability-AI/generative-models"

ARCHS: dict[str, ArchSpec] = {
    "sd1": ArchSpec(
        "sd1", "Stable Diffusion 1.x", "unet", ("text_encoder",),
        {"unet": "lora_unet_", "text_encoder": "lora_te_"}, "diffusers", None,
        "sd_v1", "stable-diffusion-v1/lora", _STABILITY, "512x512",
        UnetLayout(up_blocks_with_attention=(1, 2, 3)), ("sd1",),
    ),
    "sd2": ArchSpec(
        "sd2", "Stable Diffusion 2.x", "unet", ("text_encoder",),
        {"unet": "lora_unet_", "text_encoder": "lora_te_"}, "diffusers", None,
        "sd_v2", "stable-diffusion-v2-768-v/lora", _STABILITY, "768x768",
        UnetLayout(up_blocks_with_attention=(1, 2, 3)), ("sd2",),
    ),
    "sdxl": ArchSpec(
        "sdxl", "Stable Diffusion XL", "unet", ("text_encoder", "text_encoder_2"),
        {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, "sgm", None,
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", _STABILITY, "1024x1024",
        UnetLayout(up_blocks_with_attention=(0, 1)), ("sdxl",),
    ),
    "sd3": ArchSpec(
        "sd3", "Stable Diffusion 3.x", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
        {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
         "text_encoder_3": "lora_te3_"}, "diffusers", "text_encoder_3",
        "sd3", "stable-diffusion-3/lora", "diffusers", "1024x1024",
        None, ("sd3", "sd3.5-large", "sd3.5-medium"),
    ),
    "flux": ArchSpec(
        "flux", "Flux.1", "transformer", ("text_encoder", "text_encoder_2"),
        {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}, "bfl",
        "text_encoder_2", "flux1", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "1024x1024",
        None, ("flux",),
    ),
}
# Preference among architectures that fit a LoRA equally well (the more common first).
_PREFERENCE = ("sd1", "sdxl", "flux", "sd2", "sd3")


def spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}") from None


def component_for(arch: ArchSpec, provisional: str) -> str | None:
    """Resolve a reader's provisional component ('denoiser', 'te3', or a real name)."""
    if provisional == "denoiser":
        return arch.denoiser
    if provisional == "te3":
        return arch.te3_component
    return provisional if provisional in arch.components else None


@functools.cache
def _templates(variant: str, keep_block_index: bool) -> frozenset[tuple[str, str]]:
    return frozenset(
        (comp, template(name, keep_block_index))
        for comp, mods in keymaps.table(variant).items()
        for name in mods
    )


def _flat_shape(shape) -> tuple[int, int]:
    n = 1
    for s in shape[1:]:
        n *= s
    return (shape[0], n)


@dataclass
class Fit:
    arch: str
    misfits: list[tuple[str, str]]  # (component, name) not placed
    exact: int  # modules whose name and shape match a full-size model


def _fit(arch: ArchSpec, modules: dict[tuple[str, str], tuple[int, ...]], keep_block_index: bool) -> Fit:
    best: Fit | None = None
    for variant in arch.variants:
        templates = _templates(variant, keep_block_index)
        full = keymaps.table(variant)
        misfits, exact = [], 0
        for (prov, name), shape in modules.items():
            comp = component_for(arch, prov)
            if comp is None or (comp, template(name, keep_block_index)) not in templates:
                misfits.append((prov, name))
                continue
            ref = full.get(comp, {}).get(name)
            exact += ref is not None and _flat_shape(ref) == _flat_shape(shape)
        fit = Fit(arch.name, misfits, exact)
        if best is None or (len(fit.misfits), -fit.exact) < (len(best.misfits), -best.exact):
            best = fit
    assert best is not None
    return best


def metadata_hint(metadata: dict[str, str]) -> str | None:
    """The architecture a file's own header claims, if any."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    for prefix, name in (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux")):
        if version.startswith(prefix):
            return name
    for prefix, name in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"),
                         ("stable-diffusion-v2", "sd2"), ("stable-diffusion-3", "sd3"), ("flux", "flux")):
        if arch.startswith(prefix):
            return name
    return None


def detect(
    modules: dict[tuple[str, str], tuple[int, ...]],
    path=None,
    hints: frozenset[str] = frozenset(),
    metadata: dict[str, str] | None = None,
    labels: dict[tuple[str, str], str] | None = None,
) -> str:
    """The architecture whose module grammar places every module.

    ``modules`` maps (provisional component, diffusers module name) to the weight shape.
    Full-size shape matches break ties (SD1 vs SD2), then the file's own header, then the
    naming the reader saw (sgm names are written for SDXL, BFL names for Flux).
    """
    claimed = metadata_hint(metadata or {})
    candidates = list(ARCHS.values())
    if "bfl" in hints:
        candidates = [ARCHS["flux"]]
    for keep_block_index in (True, False):
        fits = [_fit(a, modules, keep_block_index) for a in candidates]
        placed = [f for f in fits if not f.misfits]
        if placed:
            def rank(f: Fit):
                return (
                    -f.exact,
                    f.arch != claimed,
                    not ("sgm" in hints and f.arch == "sdxl"),
                    _PREFERENCE.index(f.arch),
                )
            return min(placed, key=rank).arch
    best = min(fits, key=lambda f: len(f.misfits))
    labels = labels or {}
    shown = ", ".join(labels.get(m, f"{m[0]}.{m[1]}") for m in best.misfits[:8])
    more = f" and {len(best.misfits) - 8} more" if len(best.misfits) > 8 else ""
    raise NotALoraError(
        f"cannot place {len(best.misfits)} of {len(modules)} modules on any known architecture "
        f"(closest: {best.arch}); unmapped: {shown}{more}",
        path,
    )
