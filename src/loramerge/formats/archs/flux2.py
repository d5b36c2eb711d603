"""Flux.2 (dev, klein 4B, klein 9B; the klein "base" checkpoints share the klein configs):
Flux2Transformer2DModel, BFL names in musubi-tuner (kohya), ai-toolkit and ComfyUI files.

No LoRA format for Flux.2's text encoders (Mistral-3, Qwen3) exists in practice and diffusers
loads none, so the transformer is the only component.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from ..schemes.flux2 import FLUX2
from . import Architecture, ClientFacts, Identity, Naming, Note
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, kohya, peft


def transformer(layers: int, single: int, heads: int, context: int, guidance: bool) -> dict:
    return {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
            "num_layers": layers, "num_single_layers": single, "attention_head_dim": 128,
            "num_attention_heads": heads, "joint_attention_dim": context, "timestep_guidance_channels": 256,
            "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-06,
            "guidance_embeds": guidance}


ARCH = Architecture(
    name="flux2",
    label="Flux.2",
    denoiser="transformer",
    components=(
        dit_denoiser(FLUX2, extra=(
            Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"),  # SimpleTuner / LyCORIS on diffusers
            peft("", FLUX2, "bfl"),  # BFL-PEFT; fal's base_model.model. files
            peft("diffusion_model.", DIFFUSERS, "comfyui"),  # ai-toolkit exports with expanded names
        )),
    ),
    variants={
        "flux2-dev": {"transformer": transformer(8, 48, 48, 15360, True)},
        "flux2-klein-4b": {"transformer": transformer(5, 20, 24, 7680, False)},
        "flux2-klein-9b": {"transformer": transformer(8, 24, 32, 12288, False)},
    },
    formats={
        "kohya": {"transformer": kohya("lora_unet_", FLUX2)},  # musubi-tuner
        "comfyui": {"transformer": peft("diffusion_model.", FLUX2, "comfyui")},  # ai-toolkit
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS)},
    },
    # BFL names under diffusion_model. (ai-toolkit's files) load in ComfyUI (raw BFL names) and in
    # diffusers (its ai-toolkit Flux.2 converter), exactly but for one module: diffusers 0.42 leaves
    # final_layer.adaLN_modulation.1 in BFL (shift, scale) order (see notes). diffusers names load in
    # diffusers, in ComfyUI only through a flux_to_diffusers with Flux.2 rows, which the ComfyUI
    # sources read for these notes (2025-10) do not have.
    default_format="comfyui",
    identity=Identity("flux2", "flux-2/lora", "https://github.com/black-forest-labs/flux2", "1024x1024",
                      ss_aliases=("flux2", "flux.2", "flux_2", "flux-2"),
                      modelspec_aliases=("flux.2", "flux-2", "flux2", "flux_2"),
                      base_models=("flux.2", "flux2", "flux-2")),
    blocks=TransformerBlocks({"double": "transformer_blocks", "single": "single_transformer_blocks"}),
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"),
    notes=(
        Note("comfyui", r"^transformer\.norm_out\.linear$",
             "diffusers 0.42's ai-toolkit Flux.2 converter does not swap final_layer.adaLN_modulation.1's "
             "(shift, scale) halves, so diffusers applies that module's delta to the wrong rows; ComfyUI "
             "reads it right. --format diffusers loads right in diffusers"),
        Note("kohya", r"^transformer\.(norm_out\.linear|time_guidance_embed\.guidance_embedder\..*"
                      r"|double_stream_modulation_(img|txt)\.linear|single_stream_modulation\.linear)$",
             "diffusers 0.42's kohya Flux.2 converter drops final_layer_adaLN_modulation_1, guidance_in and "
             "the *_stream_modulation modules ('Unsupported keys'); ComfyUI loads them"),
    ),
    clients={
        # transformer. PEFT files only: the ai-toolkit converter leaves final_layer.adaLN_modulation.1
        # unswapped and the kohya one drops modules (see notes above) — not modelled
        "diffusers": ClientFacts("dit"),
        # BFL names (generic). Newer ComfyUI runs Flux2 as a Flux subclass, but whether its
        # flux_to_diffusers names fit Flux.2 is not determined (notes §8): diffusers-named keys are
        # reported as not loaded
        "comfyui": ClientFacts("comfyui"),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
