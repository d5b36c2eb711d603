"""Client facts several architecture entries share (see :class:`ClientFacts`; sources and
versions read: docs/notes/clients.md §0). Helpers return namings; each entry assembles its own
``clients={…}`` from them, so an entry shows every client's spellings for its components."""

from __future__ import annotations

from ..schemes import Scheme
from ..schemes.clientnames import CLIP_LAYER_MODULES, PROCESSOR, Only
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from . import ClientFacts, Naming
from ._common import kohya, peft

CLIP_LAYERS = Only(HF_TEXT, CLIP_LAYER_MODULES)
PROJECTION = Only(HF_TEXT, "text_projection")


def sd_unet_names() -> tuple[Naming, ...]:
    """ComfyUI's and Forge's ``unet_to_diffusers`` spellings of an SD UNet (beyond the sgm ones
    every model gets): kohya and LyCORIS flattened diffusers names, and dotted diffusers names
    only in the old attention-processor spelling, bare or under ``unet.``."""
    return (kohya("lora_unet_", DIFFUSERS), Naming("lycoris_", DIFFUSERS, flat=True),
            peft("", PROCESSOR), peft("unet.", PROCESSOR))


def dit_names(*dotted_prefixes: str) -> tuple[Naming, ...]:
    """ComfyUI's spellings of a DiT through its diffusers-name table (``mmdit_to_diffusers``,
    ``flux_to_diffusers``): dotted under the given prefixes, flattened under ``lora_transformer_``
    (OneTrainer) and ``lycoris_``."""
    return (*(peft(p, DIFFUSERS) for p in dotted_prefixes), kohya("lora_transformer_", DIFFUSERS),
            Naming("lycoris_", DIFFUSERS, flat=True))


def clip_names(kohya_prefixes: tuple[str, ...], dotted: str | None, generic: str | None = None,
               projection: tuple[Naming, ...] = ()) -> tuple[Naming, ...]:
    """A CLIP encoder as ComfyUI/Forge map it: kohya prefixes and the dotted diffusers prefix for
    the six projections of each layer only, ComfyUI's ``text_encoders.<clip>.transformer.`` for
    every weight (``generic``), and the projection spellings given."""
    names = [Naming(p, CLIP_LAYERS, flat=True) for p in kohya_prefixes]
    if dotted:
        names.append(peft(dotted, CLIP_LAYERS))
    if generic:
        names.append(peft(generic, HF_TEXT, "comfyui"))
    return (*names, *projection)


def t5_names(kohya_prefixes: tuple[str, ...], generic: str | None = None) -> tuple[Naming, ...]:
    """T5 as ComfyUI/Forge map it: ``lora_teN_`` + the flattened name of every weight."""
    names = [Naming(p, HF_TEXT, flat=True) for p in kohya_prefixes]
    if generic:
        names.append(peft(generic, HF_TEXT, "comfyui"))
    return tuple(names)


def projection(prefix: str, flat: bool = True) -> tuple[Naming, ...]:
    return (Naming(prefix, PROJECTION, flat=flat),)


def a1111_model(scheme: Scheme, prefix: str) -> Naming:
    """A1111 registers a module under its dotted path in the model with '.' → '_'."""
    return Naming(prefix, scheme, flat=True)


def sd_clients(unet: Scheme, clip: str, a1111_text: Naming, together: dict | None = None) -> dict[str, ClientFacts]:
    """SD1/SD2 (one text encoder): the four clients' facts, given the UNet's sgm scheme,
    ComfyUI's name for the encoder and how A1111 names its modules."""
    kohya_te = ("lora_te_", "lora_te1_")
    return {
        "diffusers": ClientFacts("sd"),
        "comfyui": ClientFacts("comfyui", names={
            "unet": sd_unet_names(), "text_encoder": clip_names(kohya_te, "text_encoder.", f"text_encoders.{clip}.transformer.")}),
        "forge": ClientFacts("forge", names={"unet": sd_unet_names(), "text_encoder": clip_names(kohya_te, "text_encoder.")}),
        "a1111": ClientFacts("a1111", model={"unet": a1111_model(unet, "diffusion_model_"), "text_encoder": a1111_text},
                             together=together or {}),
    }


# A1111 1.10 runs SD1, SD2, SDXL (SD3 partly): no loader for the newer models. Forge (June 2025)
# runs SD1/SD2/SDXL, Flux.1, SD3.5 and Chroma (notes §2): no loader for the others.
A1111_NONE = ClientFacts(None)
FORGE_NONE = ClientFacts(None)
