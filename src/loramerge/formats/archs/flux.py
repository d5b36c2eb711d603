"""Flux.1 (dev, schnell, Kontext): FluxTransformer2DModel (BFL names in kohya/ComfyUI files) + CLIP-L + T5-XXL.

Besides kohya (sd-scripts), ComfyUI/ai-toolkit (``diffusion_model.`` + BFL) and diffusers files,
Flux.1 LoRAs come as XLabs (x-flux) attention processors, OneTrainer's LEGACY "mixture"
(``lora_transformer_`` + diffusers names, ``lora_te1_`` CLIP-L, ``lora_te2_`` T5), bare BFL names
(BFL's control LoRAs, fal's ``base_model.model.`` files, OneTrainer's ORIGINAL) and LyCORIS
(``lycoris_`` + diffusers names, or BFL names with ``lokr_*``). BFL's control LoRAs
(FLUX.1-Depth/Canny-dev-lora) also carry RMSNorm scales that replace base weights: refused.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.bfl import BFL
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from ..schemes.xlabs import XLABS
from . import Architecture, ClientFacts, Foreign, Identity, Naming, Note
from ._clients import clip_names, dit_names, t5_names
from ._common import CLIP_L, T5_XXL, dit_denoiser, kohya, peft, text_encoder

TRANSFORMER = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
               "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
               "axes_dims_rope": [16, 56, 56]}

BFL_CONTROL = ("BFL Flux control LoRA (FLUX.1-Depth/Canny-dev-lora): {key} is an RMSNorm scale that replaces the "
               "base weight (not a delta), and its img_in takes the widened 128-channel input of the control "
               "model; neither has a ΔW on FLUX.1, so the file cannot be merged (fuse it with diffusers' "
               "FluxControlPipeline instead)")

def bfl_denoiser(scheme, *extra: Naming):
    """A Flux.1-style transformer (Flux.1, Chroma): kohya/ComfyUI/original BFL names, diffusers
    names, OneTrainer's LEGACY ``lora_transformer_`` and LyCORIS's ``lycoris_`` with flattened
    diffusers names, and bare BFL names (BFL's own, fal's ``base_model.model.``)."""
    return dit_denoiser(scheme, extra=(
        Naming("lora_transformer_", DIFFUSERS, flat=True, label="onetrainer"),
        Naming("lycoris_", DIFFUSERS, flat=True, label="lycoris"),
        peft("", scheme, "bfl"),
        *extra,
    ))


ARCH = Architecture(
    name="flux",
    label="Flux.1",
    denoiser="transformer",
    components=(
        bfl_denoiser(BFL, peft("diffusion_model.", XLABS, "xlabs"), peft("", XLABS, "xlabs")),
        text_encoder("text_encoder", ("lora_te1_",), "text_encoders.clip_l.transformer."),
        # T5: sd-scripts lora_te3_, OneTrainer's mixture lora_te2_
        text_encoder("text_encoder_2", ("lora_te3_", "lora_te2_"), "text_encoders.t5xxl.transformer."),
    ),
    variants={"flux": {"transformer": TRANSFORMER, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL}},
    formats={
        "kohya": {"transformer": kohya("lora_unet_", BFL), "text_encoder": kohya("lora_te1_", HF_TEXT),
                  "text_encoder_2": kohya("lora_te3_", HF_TEXT)},
        # ai-toolkit / ComfyUI: BFL names under diffusion_model., scale folded (diffusers 0.42 does not
        # convert these for Flux.1)
        "comfyui": {"transformer": peft("diffusion_model.", BFL, "comfyui"),
                    "text_encoder": peft("text_encoders.clip_l.transformer.", HF_TEXT, "comfyui"),
                    "text_encoder_2": peft("text_encoders.t5xxl.transformer.", HF_TEXT, "comfyui")},
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT),
                      "text_encoder_2": peft("text_encoder_2.", HF_TEXT)},
    },
    # diffusers names load exactly in diffusers, ComfyUI (row slices of the fused BFL weights) and
    # Forge; kohya Flux loses its global modules in diffusers 0.42 (see notes)
    default_format="diffusers",
    identity=Identity("flux1", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "1024x1024",
                      ss_aliases=("flux1", "flux.1", "flux_1", "flux-1", "flux"),
                      modelspec_aliases=("flux-1", "flux.1", "flux1", "flux_1"),
                      base_models=("flux.1", "flux1", "flux-1")),
    blocks=TransformerBlocks({"double": "transformer_blocks", "single": "single_transformer_blocks"}),
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlPipeline",
               "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline", "FluxFillPipeline",
               "FluxKontextPipeline", "FluxKontextInpaintPipeline"),
    notes=(
        Note("kohya", r"^transformer\.(x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear|proj_out)$",
             "diffusers 0.42 drops kohya Flux modules outside the blocks (img_in, txt_in, time_in, vector_in, "
             "guidance_in, final_layer) without a warning; ComfyUI and Forge load them. --format diffusers "
             "loads everywhere"),
        Note("kohya", r"^text_encoder_2\.", "diffusers 0.42 drops kohya Flux T5 (lora_te3_) modules"),
        Note("comfyui", r".", "diffusers 0.42 does not convert diffusion_model.-prefixed Flux.1 LoRAs "
             "(it loads nothing from them); ComfyUI and Forge do. --format diffusers loads everywhere"),
    ),
    foreign=(Foreign(r"(^|\.)(query|key)_norm\.scale$", BFL_CONTROL),),
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
