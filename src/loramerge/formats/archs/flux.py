"""Flux.1 (dev, schnell): FluxTransformer2DModel (BFL names in kohya/ComfyUI files) + CLIP-L + T5-XXL."""

from ..blockgrammar import TransformerBlocks
from ..schemes.bfl import BFL
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from . import Architecture, ClientFacts, Identity
from ._clients import clip_names, dit_names, t5_names
from ._common import CLIP_L, T5_XXL, dit_denoiser, kohya, peft, text_encoder

TRANSFORMER = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
               "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
               "axes_dims_rope": [16, 56, 56]}

ARCH = Architecture(
    name="flux",
    label="Flux.1",
    denoiser="transformer",
    components=(
        dit_denoiser(BFL),
        text_encoder("text_encoder", ("lora_te1_",), "text_encoders.clip_l.transformer."),
        text_encoder("text_encoder_2", ("lora_te3_",), "text_encoders.t5xxl.transformer."),
    ),
    variants={"flux": {"transformer": TRANSFORMER, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL}},
    formats={
        "kohya": {"transformer": kohya("lora_unet_", BFL), "text_encoder": kohya("lora_te1_", HF_TEXT),
                  "text_encoder_2": kohya("lora_te3_", HF_TEXT)},
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT),
                      "text_encoder_2": peft("text_encoder_2.", HF_TEXT)},
    },
    default_format="kohya",
    identity=Identity("flux1", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "1024x1024",
                      ss_aliases=("flux1", "flux"), modelspec_aliases=("flux-1", "flux.1", "flux1"),
                      base_models=("flux.1", "flux1", "flux-1")),
    blocks=TransformerBlocks({"double": "transformer_blocks", "single": "single_transformer_blocks"}),
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlPipeline",
               "FluxFillPipeline", "FluxKontextPipeline"),
    clients={
        "diffusers": ClientFacts("flux"),
        "comfyui": ClientFacts("comfyui", names={
            "transformer": dit_names("transformer."),
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder.", "text_encoders.clip_l.transformer."),
            "text_encoder_2": t5_names(("lora_te2_", "lora_te3_"), "text_encoders.t5xxl.transformer.")}),
        # FLUX.1 dev/schnell (Forge maps diffusers names only when its repo name says 'flux')
        "forge": ClientFacts("forge", names={
            "transformer": dit_names("transformer."),
            "text_encoder": clip_names(("lora_te_", "lora_te1_"), "text_encoder."),
            "text_encoder_2": t5_names(("lora_te1_", "lora_te2_", "lora_te3_"))}),
        "a1111": ClientFacts(None),
    },
)
