"""Stable Diffusion 3 / 3.5 (MMDiT): SD3Transformer2DModel + CLIP-L + CLIP-G + T5-XXL."""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from ..schemes.mmdit import MMDIT
from . import Architecture, ClientFacts, Identity, Naming, Note
from ._clients import clip_names, dit_names, projection, t5_names
from ._common import CLIP_G_PROJ, CLIP_L_PROJ, STABILITY, T5_XXL, dit_denoiser, kohya, peft, text_encoder


def transformer(layers: int, heads: int, caption_dim: int, **extra) -> dict:
    return {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
            "num_layers": layers, "attention_head_dim": 64, "num_attention_heads": heads,
            "joint_attention_dim": 4096, "caption_projection_dim": caption_dim, "pooled_projection_dim": 2048,
            "out_channels": 16, "pos_embed_max_size": 192, **extra}


TEXT = {"text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_G_PROJ, "text_encoder_3": T5_XXL}

ARCH = Architecture(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    denoiser="transformer",
    components=(
        # sd-scripts writes MMDiT names under lora_unet_ (split_qkv files: one fused qkv with a
        # block-diagonal up); OneTrainer's LEGACY diffusers names under lora_transformer_; SimpleTuner's
        # LyCORIS diffusers names under lycoris_
        dit_denoiser(MMDIT, extra=(Naming("lora_transformer_", DIFFUSERS, flat=True, label="onetrainer"),
                                   Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"))),
        text_encoder("text_encoder", ("lora_te1_",), "text_encoders.clip_l.transformer.",
                     single_file=(Naming("text_encoders.clip_l.transformer.", HF_TEXT),)),
        text_encoder("text_encoder_2", ("lora_te2_",), "text_encoders.clip_g.transformer.",
                     single_file=(Naming("text_encoders.clip_g.transformer.", HF_TEXT),)),
        text_encoder("text_encoder_3", ("lora_te3_",), "text_encoders.t5xxl.transformer.",
                     single_file=(Naming("text_encoders.t5xxl.transformer.", HF_TEXT),)),
    ),
    variants={
        "sd3": {"transformer": transformer(24, 24, 1536), **TEXT},
        "sd3.5-large": {"transformer": transformer(38, 38, 2432, qk_norm="rms_norm"), **TEXT},
        "sd3.5-medium": {"transformer": transformer(24, 24, 1536, pos_embed_max_size=384, qk_norm="rms_norm",
                                                    dual_attention_layers=list(range(13))), **TEXT},
    },
    formats={
        "kohya": {"transformer": kohya("lora_unet_", MMDIT), "text_encoder": kohya("lora_te1_", HF_TEXT),
                  "text_encoder_2": kohya("lora_te2_", HF_TEXT), "text_encoder_3": kohya("lora_te3_", HF_TEXT)},
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT),
                      "text_encoder_2": peft("text_encoder_2.", HF_TEXT),
                      "text_encoder_3": peft("text_encoder_3.", HF_TEXT)},
    },
    # No single file loads in both diffusers and Forge (docs/notes/clients.md §6): diffusers names
    # load exactly in diffusers and ComfyUI; kohya (sd-scripts MMDiT names) in ComfyUI and Forge, and
    # in diffusers not at all
    default_format="diffusers",
    # sd-scripts writes ss_base_model_version = the MMDiT type (5-large, 5-medium, medium), ai-toolkit sd_3
    identity=Identity("sd3", "stable-diffusion-3-medium/lora", STABILITY, "1024x1024",
                      ss_aliases=("sd3", "sd_3", "5-large", "5-medium", "medium"),
                      modelspec_aliases=("stable-diffusion-3",),
                      base_models=("stable-diffusion-3", "sd3")),
    blocks=TransformerBlocks({"joint": "transformer_blocks"}, aliases={"double": "joint"}),
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    notes=(
        Note("kohya", r".", "diffusers 0.42 loads nothing from sd-scripts-named SD3 LoRAs (only a 'No LoRA keys' "
             "warning); ComfyUI and Forge load them. --format diffusers loads in diffusers and ComfyUI"),
        Note("diffusers", r"^text_encoder_3\.", "diffusers 0.42's SD3 loader does not load T5 (text_encoder_3) "
             "LoRA modules"),
    ),
    clients={
        "diffusers": ClientFacts("sd3"),
        "comfyui": ClientFacts("comfyui", names={
            "transformer": dit_names("transformer.", "base_model.model."),
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder.", "text_encoders.clip_l.transformer.",
                                       projection("lora_te1_")),
            "text_encoder_2": clip_names(("lora_te2_",), "text_encoder_2.", "text_encoders.clip_g.transformer.",
                                         projection("lora_te2_")),
            "text_encoder_3": t5_names(("lora_te3_",), "text_encoders.t5xxl.transformer.")}),
        # Forge's SD3.5 engine: its diffusers-name branch is commented out, native names only
        "forge": ClientFacts("forge", names={
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder.", None, projection("lora_te1_")),
            "text_encoder_2": clip_names(("lora_te2_",), "text_encoder_2.", None,
                                         projection("lora_te2_") + projection("text_encoder.", flat=False)),
            "text_encoder_3": t5_names(("lora_te1_", "lora_te2_", "lora_te3_"))}),
        "a1111": ClientFacts(None),  # 1.10 maps SD3-medium's x-block attention only: treated as no loader
    },
)
