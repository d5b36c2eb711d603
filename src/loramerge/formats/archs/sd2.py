"""Stable Diffusion 2.x: the SD1 UNet at cross-attention width 1024 + OpenCLIP ViT-H/14."""

from ..blockgrammar import SD_VECTORS, UnetBlocks
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from ..schemes.openclip import OPENCLIP
from ..schemes.clientnames import A1111_OPENCLIP, OPENCLIP_ATTENTION
from . import Architecture, Identity, Naming
from ._clients import a1111_model, sd_clients
from ._common import OPENCLIP_H, STABILITY, kohya, peft, text_encoder
from .sd1 import SGM, UP_WITH_ATTENTION, unet, unet_config

ARCH = Architecture(
    name="sd2",
    label="Stable Diffusion 2.x",
    denoiser="unet",
    components=(
        unet(SGM),
        text_encoder("text_encoder", ("lora_te_",), single_file=(Naming("cond_stage_model.model.", OPENCLIP),)),
    ),
    variants={"sd2": {"unet": unet_config(1024, [5, 10, 20, 20], use_linear_projection=True, sample_size=96),
                      "text_encoder": OPENCLIP_H}},
    formats={
        "kohya": {"unet": kohya("lora_unet_", DIFFUSERS), "text_encoder": kohya("lora_te_", HF_TEXT)},
        "diffusers": {"unet": peft("unet.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT)},
    },
    default_format="kohya",
    identity=Identity("sd_v2", "stable-diffusion-v2-768-v/lora", STABILITY, "768x768",
                      ss_aliases=("sd_v2", "sd2", "v2"), modelspec_aliases=("stable-diffusion-v2",),
                      base_models=("stable-diffusion-2", "sd-v2", "sd2", "sd21"),
                      header={"ss_v2": "True"}),  # what A1111/Forge's LoRA pages read as SD2
    blocks=UnetBlocks(UP_WITH_ATTENTION, down_blocks=4, vectors=SD_VECTORS),
    pipelines=(),  # SD2 folders use StableDiffusionPipeline too: told apart from SD1 by width
    # A1111 holds OpenCLIP's attention as one MultiheadAttention: q, k, v, out apply together
    clients=sd_clients(SGM, "clip_h", a1111_model(A1111_OPENCLIP, "model_"), {"text_encoder": OPENCLIP_ATTENTION}),
)
