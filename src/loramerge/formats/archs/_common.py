"""Pieces several architecture entries share: text-encoder configs and the usual namings."""

from __future__ import annotations

from ..schemes import Scheme
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from . import Component, Naming

STABILITY = "https://github.com/Stability-AI/generative-models"

CLIP_L = {"_class_name": "CLIPTextModel", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_L_PROJ = {**CLIP_L, "_class_name": "CLIPTextModelWithProjection"}
CLIP_G_PROJ = {"_class_name": "CLIPTextModelWithProjection", "hidden_size": 1280, "intermediate_size": 5120,
               "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
               "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280}
OPENCLIP_H = {"_class_name": "CLIPTextModel", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
              "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 512}
T5_XXL = {"_class_name": "T5EncoderModel", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
          "num_layers": 24, "feed_forward_proj": "gated-gelu", "vocab_size": 32128,
          "relative_attention_num_buckets": 32}


def kohya(prefix: str, scheme: Scheme) -> Naming:
    return Naming(prefix, scheme, flat=True)


def peft(prefix: str, scheme: Scheme, label: str = "diffusers") -> Naming:
    return Naming(prefix, scheme, style="peft", label=label)


def comfyui(prefix: str, scheme: Scheme) -> Naming:
    """ComfyUI-style PEFT keys (``diffusion_model.`` + original names): bias deltas as ``diff_b``,
    which ComfyUI adds to the bias (it does not read ``lora_B.bias``)."""
    return Naming(prefix, scheme, style="peft", label="comfyui", bias_key="diff_b")


def dit_formats(original: Scheme, comfy: Scheme | None = None) -> dict[str, dict[str, Naming]]:
    """The three formats of a video/image DiT's ``transformer``: ComfyUI-style (``diffusion_model.``
    + original names, PEFT factors, scale folded), kohya (``lora_unet_`` + flattened original
    names, one .alpha) and diffusers (``transformer.`` + diffusers names)."""
    return {"comfyui": {"transformer": comfyui("diffusion_model.", comfy or original)},
            "kohya": {"transformer": kohya("lora_unet_", original)},
            "diffusers": {"transformer": peft("transformer.", DIFFUSERS)}}


def text_encoder(name: str, kohya_prefixes: tuple[str, ...], comfy_prefix: str | None = None,
                 single_file: tuple[Naming, ...] = ()) -> Component:
    """A transformers text encoder: kohya prefixes, diffusers' ``name.`` prefix, bare PEFT names,
    and ComfyUI's ``text_encoders.<name>.transformer.`` where the architecture has it."""
    read = [kohya(p, HF_TEXT) for p in kohya_prefixes]
    read += [peft(f"{name}.", HF_TEXT), peft("", HF_TEXT)]
    if comfy_prefix:
        read.append(peft(comfy_prefix, HF_TEXT, "comfyui"))
    return Component(name, tuple(read), single_file)


def dit_denoiser(original: Scheme, kohya_prefixes: tuple[str, ...] = ("lora_unet_",),
                 extra: tuple[Naming, ...] = (), single_file_prefixes: tuple[str, ...] = ("model.diffusion_model.", "")
                 ) -> Component:
    """A diffusers transformer whose original checkpoints use ``original`` names: kohya-style
    tools flatten the original names, ComfyUI prefixes them with ``diffusion_model.``, diffusers
    and PEFT use the diffusers names (``transformer.`` or bare)."""
    read = [kohya(p, original) for p in kohya_prefixes]
    read += [
        Naming("lycoris_", original, flat=True, label="lycoris"),
        peft("transformer.", DIFFUSERS),
        peft("", DIFFUSERS),
        peft("diffusion_model.", original, "comfyui"),
        peft("model.diffusion_model.", original, "comfyui"),
        *extra,
    ]
    single = tuple(Naming(p, original) for p in single_file_prefixes)
    return Component("transformer", tuple(read), single)
