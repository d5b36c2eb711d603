"""Lumina-Image-2.0 (and its finetunes: Neta Lumina, NetaYume…): Lumina2Transformer2DModel, a
NextDiT of width 2304 with grouped-query attention.

Original/ComfyUI names (fused ``attention.qkv`` = q 2304 : k 768 : v 768 rows, ``attention.out``,
``feed_forward.w1..3``, ``adaLN_modulation.1``, ``final_layer``…) are what kohya sd-scripts and
diffusion-pipe write; ai-toolkit and diffusers' trainer write diffusers names. Same containers
and original names as Z-Image: the two are told apart by their shapes (width 2304 vs 3840, the
fused qkv's input width) or, for shapes of neither, by the header.

Text-encoder LoRAs (Gemma-2-2B, sd-scripts ``lora_te_``) load in no client but sd-scripts and
are refused.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from ..schemes.nextdit import LUMINA2
from . import Architecture, ClientFacts, Identity, Naming, Note, Unsupported
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, kohya, peft

TRANSFORMER = {"_class_name": "Lumina2Transformer2DModel", "axes_dim_rope": [32, 32, 32], "axes_lens": [300, 512, 512],
               "cap_feat_dim": 2304, "ffn_dim_multiplier": None, "hidden_size": 2304, "in_channels": 16,
               "multiple_of": 256, "norm_eps": 1e-05, "num_attention_heads": 24, "num_kv_heads": 8, "num_layers": 26,
               "num_refiner_layers": 2, "out_channels": None, "patch_size": 2, "sample_size": 128,
               "scaling_factor": 1.0}

ARCH = Architecture(
    name="lumina2",
    label="Lumina-Image-2.0",
    denoiser="transformer",
    components=(
        # lora_unet_ (original names): kohya sd-scripts; diffusion_model. (original): diffusion-pipe;
        # transformer. (diffusers names): ai-toolkit, diffusers
        dit_denoiser(LUMINA2, extra=(
            peft("diffusion_model.", DIFFUSERS, "comfyui"),
            Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"),
        ), single_file_prefixes=("model.diffusion_model.", "diffusion_model.", "")),
    ),
    variants={"lumina2": {"transformer": TRANSFORMER}},
    formats={
        "kohya": {"transformer": kohya("lora_unet_", LUMINA2)},  # sd-scripts networks/lora_lumina.py
        "comfyui": {"transformer": peft("diffusion_model.", LUMINA2, "comfyui")},  # diffusion-pipe
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS)},
    },
    # No format loads every LoRA in both clients: ComfyUI knows no diffusers names for Lumina 2,
    # and diffusers 0.42 converts diffusion_model. files only when every block from 0 up has
    # all its block modules (qkv, out, w1-w3, adaLN) and nothing outside the blocks (anything
    # else raises). comfyui is exact in ComfyUI always and in diffusers for the whole-model
    # block LoRAs diffusion-pipe writes and merges of them; --format diffusers for any other
    # LoRA meant for diffusers.
    default_format="comfyui",
    identity=Identity(
        "lumina2", "lumina-2/lora", "https://github.com/Alpha-VLLM/Lumina-Image-2.0", "1024x1024",
        ss_aliases=("lumina",), modelspec_aliases=("lumina",),
        base_models=("lumina-image-2", "lumina2", "lumina-2", "lumina_2", "neta-lumina", "netayume"),
    ),
    blocks=TransformerBlocks({"layer": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"},
                             aliases={"layers": "layer", "block": "layer"}),
    pipelines=("Lumina2Pipeline", "Lumina2Text2ImgPipeline"),
    notes=(Note("comfyui", r".", "diffusers 0.42 loads comfyui-format Lumina 2 LoRAs only when every block has all "
                "its block modules and no module lies outside the blocks"),),
    unsupported=(Unsupported("text encoder (Gemma-2)", ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders."),
                             "kohya sd-scripts text-encoder LoRAs, which diffusers and ComfyUI do not load"),),
    clients={
        # transformer. PEFT files only: the diffusion_model. converter loads a file only when every
        # block from 0 up has all its block modules and nothing lies outside the blocks (else it
        # raises), and lora_unet_ files load nothing — neither is modelled (reported unknown)
        "diffusers": ClientFacts("dit"),
        # the generic original names only: ComfyUI's Lumina2 branch (z_image_to_diffusers) spells
        # Z-Image's diffusers names (attention.to_q), not Lumina 2's (attn.to_q), and how it would
        # slice Lumina 2's grouped-query qkv was not read — left out (such keys: not loaded)
        "comfyui": ClientFacts("comfyui"),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
