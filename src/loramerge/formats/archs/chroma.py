"""Chroma (Chroma1-Base/-HD/-Flash): ChromaTransformer2DModel (Flux.1's blocks without modulation
Linears, plus a distilled guidance layer; BFL names in kohya/ComfyUI files) + a T5-XXL text encoder.

A Flux.1 LoRA without modulation modules has Chroma's names and shapes: such files are told apart
by the header (``ss_base_model_version`` chroma, ``modelspec.architecture`` chroma/lora), else
reported as ambiguous.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.bfl import CHROMA
from ..schemes.diffusers import DIFFUSERS, HF_TEXT
from . import Architecture, ClientFacts, Identity, Note
from ._clients import A1111_NONE, dit_names, t5_names
from ._common import T5_XXL, kohya, peft, text_encoder
from .flux import bfl_denoiser

TRANSFORMER = {"_class_name": "ChromaTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
               "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 4096, "axes_dims_rope": [16, 56, 56], "approximator_num_channels": 64,
               "approximator_hidden_dim": 5120, "approximator_layers": 5}

ARCH = Architecture(
    name="chroma",
    label="Chroma",
    denoiser="transformer",
    components=(
        bfl_denoiser(CHROMA),
        # T5: sd-scripts lora_te3_, OneTrainer lora_te_, ComfyUI (T5-only model) lora_te1_
        text_encoder("text_encoder", ("lora_te1_", "lora_te3_", "lora_te_"), "text_encoders.t5xxl.transformer."),
    ),
    variants={"chroma": {"transformer": TRANSFORMER, "text_encoder": T5_XXL}},
    formats={
        "kohya": {"transformer": kohya("lora_unet_", CHROMA), "text_encoder": kohya("lora_te1_", HF_TEXT)},
        "comfyui": {"transformer": peft("diffusion_model.", CHROMA, "comfyui"),
                    "text_encoder": peft("text_encoders.t5xxl.transformer.", HF_TEXT, "comfyui")},
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS), "text_encoder": peft("text_encoder.", HF_TEXT)},
    },
    # ChromaPipeline loads LoRAs with Flux.1's loader: diffusers names load exactly (and in ComfyUI,
    # whose Chroma model is a Flux); ai-toolkit's diffusion_model. files load nothing there and kohya
    # files lose img_in/txt_in/final_layer and refuse the guidance layer
    default_format="diffusers",
    identity=Identity("chroma", "chroma/lora", "https://huggingface.co/lodestones/Chroma", "1024x1024",
                      ss_aliases=("chroma",), modelspec_aliases=("chroma",), base_models=("chroma",)),
    blocks=TransformerBlocks({"double": "transformer_blocks", "single": "single_transformer_blocks"}),
    pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    notes=(
        Note("kohya", r"^transformer\.(x_embedder|context_embedder|proj_out)$",
             "diffusers 0.42 drops kohya Chroma modules outside the blocks (img_in, txt_in, final_layer) "
             "without a warning; ComfyUI loads them"),
        Note("kohya", r"^transformer\.distilled_guidance_layer\.",
             "diffusers 0.42 refuses kohya Chroma files with distilled_guidance_layer modules "
             "('Incompatible keys'); ComfyUI loads them. --format diffusers loads in both"),
        Note("comfyui", r".", "diffusers 0.42 loads nothing from diffusion_model.-prefixed Chroma LoRAs; "
             "ComfyUI does. --format diffusers loads in both"),
    ),
    clients={
        # ChromaPipeline runs Flux.1's loader (notes §4.4); modelled for the transformer only
        "diffusers": ClientFacts("chroma"),
        # ComfyUI's Chroma is a Flux subclass: the Flux branch's diffusers names; T5 alone is lora_te1_
        "comfyui": ClientFacts("comfyui", names={
            "transformer": dit_names("transformer."),
            "text_encoder": t5_names(("lora_te1_",), "text_encoders.t5xxl.transformer.")}),
        # Forge has a Chroma engine (T5 only), but maps diffusers names only for repos named 'flux'
        # (Chroma's is 'Chroma', notes §2.2): BFL names only; T5 as lora_te1_/te2_/te3_
        "forge": ClientFacts("forge", names={"text_encoder": t5_names(("lora_te1_", "lora_te2_", "lora_te3_"))}),
        "a1111": A1111_NONE,
    },
)
