"""Stable Diffusion XL: UNet2DConditionModel (sgm names in kohya files) + CLIP-L + OpenCLIP bigG."""

from ..blockgrammar import SDXL_VECTORS, UnetBlocks
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from ..schemes.openclip import OPENCLIP
from ..schemes.sgm import Sgm
from ..schemes.clientnames import A1111_OPENCLIP, OPENCLIP_ATTENTION
from . import Architecture, ClientFacts, Identity, Naming
from ._clients import a1111_model, clip_names, projection, sd_unet_names
from ._common import CLIP_L, CLIP_G_PROJ, STABILITY, kohya, peft, text_encoder
from .sd1 import unet

UP_WITH_ATTENTION = (0, 1)
SGM = Sgm(UP_WITH_ATTENTION)

UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}

ARCH = Architecture(
    name="sdxl",
    label="Stable Diffusion XL",
    denoiser="unet",
    components=(
        unet(SGM),
        text_encoder("text_encoder", ("lora_te1_",), "text_encoders.clip_l.transformer.",
                     single_file=(Naming("conditioner.embedders.0.transformer.", HF_TEXT),)),
        text_encoder("text_encoder_2", ("lora_te2_",), "text_encoders.clip_g.transformer.",
                     single_file=(Naming("conditioner.embedders.1.model.", OPENCLIP),)),
    ),
    variants={"sdxl": {"unet": UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G_PROJ}},
    formats={
        "kohya": {"unet": kohya("lora_unet_", SGM), "text_encoder": kohya("lora_te1_", HF_TEXT),
                  "text_encoder_2": kohya("lora_te2_", HF_TEXT)},
        "diffusers": {"unet": peft("unet.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT),
                      "text_encoder_2": peft("text_encoder_2.", HF_TEXT)},
    },
    default_format="kohya",
    identity=Identity("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", STABILITY, "1024x1024",
                      ss_aliases=("sdxl",), modelspec_aliases=("stable-diffusion-xl",),
                      base_models=("stable-diffusion-xl", "sdxl", "sd_xl", "playground-v2", "pony", "illustrious",
                                   "animagine-xl", "juggernaut-xl", "realvisxl")),
    blocks=UnetBlocks(UP_WITH_ATTENTION, down_blocks=3, vectors=SDXL_VECTORS),
    pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    clients={
        "diffusers": ClientFacts("sdxl"),
        "comfyui": ClientFacts("comfyui", names={
            "unet": sd_unet_names(),
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder.", "text_encoders.clip_l.transformer."),
            "text_encoder_2": clip_names(("lora_te2_",), "text_encoder_2.", "text_encoders.clip_g.transformer.",
                                         projection("lora_te2_"))}),
        "forge": ClientFacts("forge", names={
            "unet": sd_unet_names(),
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder."),
            "text_encoder_2": clip_names(("lora_te2_",), "text_encoder_2.", None,
                                         projection("lora_te2_") + projection("text_encoder.", flat=False))}),
        "a1111": ClientFacts("a1111", model={"unet": a1111_model(SGM, "diffusion_model_"),
                                             "text_encoder": a1111_model(HF_TEXT, "0_transformer_"),
                                             "text_encoder_2": a1111_model(A1111_OPENCLIP, "1_model_")},
                             together={"text_encoder_2": OPENCLIP_ATTENTION}),
    },
)
