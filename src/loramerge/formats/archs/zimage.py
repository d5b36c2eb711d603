"""Z-Image (Turbo, base, Omni-Base): ZImageTransformer2DModel, a NextDiT of width 3840.

Two namings meet in its files: diffusers' (split to_q/to_k/to_v, ``attention.to_out.0``,
``all_x_embedder.2-1``…; musubi-tuner, ai-toolkit, DiffSynth, OneTrainer, diffusers) and the
original/ComfyUI one (fused ``attention.qkv`` in equal thirds, ``attention.out``, ``x_embedder``,
``final_layer``; diffusion-pipe, musubi's convert-to-Comfy output). Both are read under every
prefix. Turbo and base have the same keys and shapes (no tool records which one a LoRA is
for); Omni adds ``siglip_refiner``/``siglip_embedder``, so shapes tell it apart only when the
LoRA touches them.

Text-encoder LoRAs (Qwen3-4B) are written by no known trainer and are refused.
"""

from dataclasses import replace

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from ..schemes.nextdit import ZIMAGE, ZIMAGE_DIFFUSERS
from . import Architecture, ClientFacts, Identity, Naming, Note, Unsupported
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, kohya, peft

TRANSFORMER = {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
               "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840,
               "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
               "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0, "siglip_feat_dim": None}

ARCH = Architecture(
    name="zimage",
    label="Z-Image",
    denoiser="transformer",
    components=(
        replace(dit_denoiser(ZIMAGE, extra=(
            kohya("lora_unet_", DIFFUSERS),  # musubi-tuner, OneTrainer KOHYA
            # ai-toolkit (LoRA and LoKr), OneTrainer COMFY; dotted 'to.q' and '.lora.down' (Anime-Z)
            peft("diffusion_model.", ZIMAGE_DIFFUSERS, "comfyui"),
            peft("model.diffusion_model.", DIFFUSERS, "comfyui"),
            Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"),  # SimpleTuner
        )), single_file=(
            # ComfyUI's layout (fused qkv), and the official release's diffusers names
            Naming("model.diffusion_model.", ZIMAGE), Naming("diffusion_model.", ZIMAGE), Naming("", ZIMAGE),
            Naming("", DIFFUSERS),
        )),
    ),
    variants={
        "z-image-turbo": {"transformer": TRANSFORMER},
        "z-image": {"transformer": TRANSFORMER},
        "z-image-omni": {"transformer": {**TRANSFORMER, "siglip_feat_dim": 1152}},
    },
    formats={
        # the original names kohya-style (fused qkv), as musubi's convert_z_image_lora_to_comfy
        # writes: ComfyUI loads them and diffusers splits the qkv, but diffusers 0.42 drops
        # x_embedder and final_layer in this naming (ComfyUI loads them)
        "kohya": {"transformer": kohya("lora_unet_", ZIMAGE)},
        # ai-toolkit's layout: diffusion_model. + diffusers names. diffusion-pipe's (original names)
        # is not written: diffusers 0.42 silently drops its attention.qkv/attention.out
        "comfyui": {"transformer": peft("diffusion_model.", DIFFUSERS, "comfyui")},
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS)},
    },
    # loads exactly in diffusers 0.42 (prefix stripped, every module) and in ComfyUI (its
    # z_image_to_diffusers map slices q/k/v into the fused qkv)
    default_format="comfyui",
    identity=Identity(
        "zimage", "Z-Image/lora", "https://github.com/Tongyi-MAI/Z-Image", "1024x1024",
        ss_aliases=("zimage", "z_image", "z-image"), modelspec_aliases=("z-image", "z_image", "zimage"),
        base_models=("z-image", "z_image", "zimage"),
    ),
    blocks=TransformerBlocks({"layer": "layers", "noise_refiner": "noise_refiner",
                              "context_refiner": "context_refiner", "siglip_refiner": "siglip_refiner"},
                             aliases={"layers": "layer", "block": "layer"}),
    pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageOmniPipeline",
               "ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline"),
    notes=(Note("kohya", r"^transformer\.all_(x_embedder|final_layer)\.",
                "diffusers 0.42 drops kohya-format Z-Image x_embedder and final_layer modules (its converter renames "
                "them to no module); ComfyUI loads them"),),
    unsupported=(Unsupported("text encoder (Qwen3)", ("text_encoder.", "lora_te_", "lora_te1_", "text_encoders."),
                             "no trainer writes them and diffusers never loads them"),),
    clients={
        # its converter takes diffusion_model. + diffusers names (ai-toolkit) and lora_unet_ +
        # diffusers names (musubi) to the same modules (tests/test_arch_qwen.py); the original
        # names (fused qkv) lose x_embedder/final_layer (kohya) or qkv/out (diffusion-pipe): not modelled
        "diffusers": ClientFacts("dit", names={"transformer": (
            peft("diffusion_model.", DIFFUSERS, "comfyui"), kohya("lora_unet_", DIFFUSERS))}),
        # z_image_to_diffusers (its Lumina2 branch, in ComfyUI copies of 2026-01; the a125cd8 the client
        # restates predates Z-Image): diffusers names under diffusion_model., transformer., bare, and
        # flattened under lycoris_, mapped to row slices of the fused qkv. musubi's lora_unet_ +
        # diffusers names have no candidate
        "comfyui": ClientFacts("comfyui", names={"transformer": (
            peft("diffusion_model.", DIFFUSERS), peft("transformer.", DIFFUSERS), peft("", DIFFUSERS),
            Naming("lycoris_", DIFFUSERS, flat=True))}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
