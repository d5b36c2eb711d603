"""Stable Diffusion 1.x: UNet2DConditionModel + CLIP ViT-L/14 text encoder."""

from ..blockgrammar import SD_VECTORS, UnetBlocks
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from ..schemes.sgm import Sgm
from . import Architecture, Component, Identity, Naming
from ._clients import a1111_model, sd_clients
from ._common import CLIP_L, STABILITY, kohya, peft, text_encoder

UP_WITH_ATTENTION = (1, 2, 3)
SGM = Sgm(UP_WITH_ATTENTION)


def unet_config(cross_attention_dim: int, attention_head_dim, **extra) -> dict:
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": attention_head_dim,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "cross_attention_dim": cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            **extra}


def unet(sgm: Sgm) -> Component:
    """An SD UNet: kohya names (diffusers blocks for SD1/2, sgm blocks for SDXL; both read),
    diffusers/PEFT names, ComfyUI's ``diffusion_model.`` with sgm blocks."""
    return Component("unet", (
        kohya("lora_unet_", DIFFUSERS), kohya("lora_unet_", sgm),
        Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"), Naming("lycoris_", sgm, flat=True, label="lycoris"),
        peft("unet.", DIFFUSERS), peft("", DIFFUSERS), peft("", sgm, "comfyui"),
        peft("diffusion_model.", sgm, "comfyui"), peft("model.diffusion_model.", sgm, "comfyui"),
    ), single_file=(Naming("model.diffusion_model.", sgm),))


ARCH = Architecture(
    name="sd1",
    label="Stable Diffusion 1.x",
    denoiser="unet",
    components=(
        unet(SGM),
        text_encoder("text_encoder", ("lora_te_",),
                     single_file=(Naming("cond_stage_model.transformer.", HF_TEXT),)),
    ),
    variants={"sd1": {"unet": unet_config(768, 8), "text_encoder": CLIP_L}},
    formats={
        "kohya": {"unet": kohya("lora_unet_", DIFFUSERS), "text_encoder": kohya("lora_te_", HF_TEXT)},
        "diffusers": {"unet": peft("unet.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT)},
    },
    default_format="kohya",
    identity=Identity("sd_v1", "stable-diffusion-v1/lora", STABILITY, "512x512",
                      ss_aliases=("sd_v1", "sd1", "v1", "sd_1"), modelspec_aliases=("stable-diffusion-v1",),
                      base_models=("stable-diffusion-v1", "sd-v1", "runwayml/stable-diffusion", "sd1.5", "sd15",
                                   "stable-diffusion-1", "sd-legacy/stable-diffusion-v1")),
    blocks=UnetBlocks(UP_WITH_ATTENTION, down_blocks=4, vectors=SD_VECTORS),
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    clients=sd_clients(SGM, "clip_l", a1111_model(HF_TEXT, "transformer_")),
)
