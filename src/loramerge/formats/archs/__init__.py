"""Architectures as data: one entry per architecture, in one module of this package each.

An :class:`Architecture` says what a model family is made of and how files name it:
- its components (denoiser, text encoders), each with the full-size configs of every variant
  (key tables are generated from them on the meta device: :mod:`..keymaps`);
- how LoRA files name each component's modules (:class:`Naming`: a key prefix, kohya's
  flattening or dotted names, and a naming scheme from :mod:`..schemes`), and which naming
  each output format writes;
- how single-file checkpoints name the weights (for ``fuse``/``extract``);
- its block grammar (per-block weights), the metadata values that identify it, and the
  diffusers pipeline classes that hold it;
- what each client (diffusers, ComfyUI, A1111, Forge) does with its LoRAs (:class:`ClientFacts`:
  which loader runs, which key spellings it maps beyond those it maps for every model); the
  clients' own logic lives in :mod:`loramerge.clients`, and ``loramerge check`` and the writers'
  warnings come from both. An architecture without facts for a client is reported as unknown
  to that client, never as loading exactly.

Adding an architecture = a new module here defining ``ARCH`` (or ``ARCHS``), plus a scheme
module if it brings a new naming, plus ``python scripts/gen_keymaps.py``. Nothing else
compares architecture names.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Union

from ...errors import UsageError
from ..blockgrammar import TransformerBlocks, UnetBlocks
from ..schemes import Scheme

BlockGrammar = Union[UnetBlocks, TransformerBlocks]


@dataclass(frozen=True)
class Naming:
    """One way files name a component's modules."""

    prefix: str  # key prefix: 'lora_unet_', 'transformer.', 'diffusion_model.', '' …
    scheme: Scheme
    flat: bool = False  # kohya: dots flattened to '_'
    style: str = "kohya"  # factor keys written: kohya (lora_down/lora_up/.alpha) or peft (lora_A/lora_B)
    label: str = "kohya"  # the format name reported for files that use it
    bias_key: str | None = None  # suffix bias deltas are written under (None: diff_b for kohya, lora_B.bias for peft)


@dataclass(frozen=True)
class Component:
    name: str  # the diffusers pipeline attribute: unet, transformer, text_encoder…
    read: tuple[Naming, ...]  # how LoRA files name its modules (first match wins ties)
    single_file: tuple[Naming, ...] = ()  # how single-file checkpoints name its weights


@dataclass(frozen=True)
class Identity:
    """What the architecture writes into a LoRA's header and how headers name it."""

    ss_base_model_version: str
    modelspec_architecture: str
    implementation: str
    resolution: str
    # header values that mean this architecture (prefixes, lower case)
    ss_aliases: tuple[str, ...] = ()
    modelspec_aliases: tuple[str, ...] = ()
    # substrings of a PEFT adapter's base_model_name_or_path (lower case)
    base_models: tuple[str, ...] = ()
    # variants whose keys and shapes are identical are told apart only by the header: the
    # modelspec.architecture / ss_base_model_version values (compared up to a '/', any case)
    # naming one variant; the first is written into LoRAs of that variant
    variant_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # further header fields the architecture's LoRAs carry (SD2: ss_v2, which A1111/Forge read)
    header: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Unsupported:
    """Key prefixes of a part of the model loramerge does not read (a text encoder no client
    loads LoRAs for…): files using them are refused with ``reason``, not as unknown keys."""

    component: str
    prefixes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Note:
    """A client fact the writer warns about: writing ``format`` with a module whose canonical
    key (``component.name``) matches ``pattern`` (a regex, searched)."""

    format: str
    pattern: str
    message: str


@dataclass(frozen=True)
class Foreign:
    """Keys (regex, searched) that mark a file whose content has no ΔW to merge; reading such a
    file is refused with ``message`` ({key} is the first such key)."""

    pattern: str
    message: str


@dataclass(frozen=True, eq=False)
class ClientFacts:
    """What one client's LoRA loader does with one architecture.

    ``loader``: which of the client's loaders runs (the client module names them: diffusers
    'sd', 'sdxl', 'sd3', 'flux', 'chroma', 'dit'; ComfyUI/Forge/A1111 have one), or None when
    the client has no loader for this architecture (nothing in the file is applied).
    ``names``: per component, the key spellings the client maps onto its modules beyond those
    it maps for every model (ComfyUI and Forge map ``lora_unet_`` + the flattened native name
    and ``diffusion_model.`` + the native name of every denoiser parameter themselves). For
    diffusers' 'dit' loader: the non-diffusers spellings its converter is known to take to the
    same modules at the file's scale (verified against diffusers in the architecture tests).
    ``native``: the scheme of the client's own denoiser parameter names, where it differs from
    the single-file checkpoints' (ComfyUI's HunyuanVideo model is built from Flux's layers).
    ``model``: per component, how the client names its own modules (A1111 patches its
    LDM/sgm modules under their flattened paths).
    ``together``: per component, modules the client applies only as a complete group (A1111's
    OpenCLIP attention: q, k, v and out of one layer, or none of them), as templates with
    ``{i}`` for the layer.
    """

    loader: str | None
    names: dict[str, tuple[Naming, ...]] = field(default_factory=dict)
    model: dict[str, Naming] = field(default_factory=dict)
    together: dict[str, tuple[str, ...]] = field(default_factory=dict)
    native: Scheme | None = None


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per architecture
class Architecture:
    name: str
    label: str
    denoiser: str
    components: tuple[Component, ...]
    variants: dict[str, dict[str, dict]]  # variant → component → full-size config
    formats: dict[str, dict[str, Naming]]  # output format → component → naming it writes
    default_format: str
    identity: Identity
    blocks: BlockGrammar
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes (model_index.json _class_name)
    # further denoiser components with the denoiser's block grammar (Wan 2.2's low-noise transformer_2)
    experts: tuple[str, ...] = ()
    notes: tuple[Note, ...] = field(default=())  # client facts a writer warns about
    unsupported: tuple[Unsupported, ...] = ()  # parts whose LoRA modules are refused
    foreign: tuple[Foreign, ...] = field(default=())  # keys of files that cannot be merged
    clients: dict[str, ClientFacts] = field(default_factory=dict)  # client name → facts

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def denoisers(self) -> tuple[str, ...]:
        return (self.denoiser, *self.experts)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Every component that is not a denoiser (text encoders, text connectors)."""
        return tuple(c.name for c in self.components if c.name not in self.denoisers)

    def denoiser_classes(self) -> set[str]:
        return {cfg[self.denoiser]["_class_name"] for cfg in self.variants.values() if self.denoiser in cfg}

    def naming(self, format: str, component: str) -> Naming | None:
        return self.formats.get(format, {}).get(component)


@functools.cache
def registry() -> dict[str, Architecture]:
    """Every architecture entry of this package, by name."""
    found: dict[str, Architecture] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        entries = getattr(module, "ARCHS", None) or [module.ARCH]
        for arch in entries:
            if arch.name in found:
                raise RuntimeError(f"architecture {arch.name!r} defined twice")
            found[arch.name] = arch
    return found


def names() -> list[str]:
    return list(registry())


def spec(name: str) -> Architecture:
    try:
        return registry()[name]
    except KeyError:
        import difflib

        hint = difflib.get_close_matches(name, names(), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UsageError(f"unknown architecture {name!r}{extra}; known: {', '.join(names())}") from None


def variant_configs() -> dict[str, dict[str, dict]]:
    """{variant: {component: config}} over every architecture (for the key-table generator)."""
    return {v: cfg for arch in registry().values() for v, cfg in arch.variants.items()}


def variant_arch(variant: str) -> Architecture:
    for arch in registry().values():
        if variant in arch.variants:
            return arch
    raise KeyError(variant)


def identify(pipeline_class: str | None, denoiser_configs: dict[str, dict]) -> Architecture | None:
    """The architecture of a diffusers pipeline, from its class name (model_index.json) or its
    denoiser's class; architectures sharing both (SD1 and SD2) are told apart by how much of
    the denoiser's config agrees with each one's full-size configs. ``denoiser_configs`` maps a
    component name (unet, transformer) to its config dict."""
    everything = list(registry().values())
    candidates = [a for a in everything if pipeline_class in a.pipelines]
    if not candidates:
        candidates = [a for a in everything
                      if denoiser_configs.get(a.denoiser, {}).get("_class_name") in a.denoiser_classes()]
    if not candidates:
        return None

    def agreement(arch: Architecture) -> int:
        mine = denoiser_configs.get(arch.denoiser, {})
        return max(sum(mine.get(k) == v for k, v in cfg[arch.denoiser].items()) for cfg in arch.variants.values())

    return max(candidates, key=agreement)


def describe() -> list[dict]:
    """Every architecture as plain data: what ``loramerge archs`` and the README table show."""
    rows = []
    for arch in registry().values():
        reads = []
        for component in arch.components:
            for naming in component.read:
                spelled = f"{naming.prefix or '(bare)'}{'<flat ' if naming.flat else '<'}{naming.scheme.name}>"
                entry = f"{naming.label}: {spelled}"
                if entry not in reads:
                    reads.append(entry)
        rows.append({
            "name": arch.name, "label": arch.label, "variants": list(arch.variants),
            "components": list(arch.component_names), "reads": reads,
            "writes": list(arch.formats), "default_format": arch.default_format,
            # the block kinds --block-weights takes for a transformer (UNets: A1111's IN/MID/OUT)
            "block_kinds": list(getattr(arch.blocks, "kinds", {})) or None,
        })
    return rows
