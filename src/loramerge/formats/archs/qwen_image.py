"""Qwen-Image (+ Edit, Edit-2509, Edit-2511, 2512, Layered): QwenImageTransformer2DModel.

Every released variant has the same transformer (60 dual-stream blocks, width 3072) and every
tool names it as diffusers does — original checkpoints, ComfyUI, musubi-tuner, ai-toolkit,
diffusion-pipe, DiffSynth, OneTrainer — so one scheme (the diffusers names) serves all files and
nothing is fused. The variants' LoRAs have identical keys and shapes: a file's variant is
known only when its header names it (musubi's modelspec.architecture), else undetermined.

Text-encoder LoRAs (Qwen2.5-VL, written only by OneTrainer; diffusers never loads them) are
refused with a message naming the encoder.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from . import Architecture, ClientFacts, Identity, Naming, Unsupported
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, kohya, peft

TRANSFORMER = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128,
               "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
               "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
               "patch_size": 2, "zero_cond_t": False, "use_additional_t_cond": False, "use_layer3d_rope": False}


def variant(**flags) -> dict:
    return {"transformer": {**TRANSFORMER, **flags}}


ARCH = Architecture(
    name="qwen_image",
    label="Qwen-Image",
    denoiser="transformer",
    components=(
        # kohya: musubi-tuner / OneTrainer KOHYA; diffusion_model.: ai-toolkit, diffusion-pipe,
        # OneTrainer COMFY; bare: DiffSynth (lora_A.default), OneTrainer ORIGINAL; transformer.:
        # diffusers, OneTrainer DIFFUSERS and LEGACY (lora_down/lora_up + alpha)
        dit_denoiser(DIFFUSERS, single_file_prefixes=("model.diffusion_model.", "diffusion_model.", "")),
    ),
    variants={
        "qwen-image": variant(),
        "qwen-image-edit": variant(),
        "qwen-image-edit-2509": variant(),
        "qwen-image-edit-2511": variant(zero_cond_t=True),  # no new weights
        "qwen-image-2512": variant(),
        "qwen-image-layered": variant(use_additional_t_cond=True, use_layer3d_rope=True),  # + an Embedding
    },
    formats={
        "kohya": {"transformer": kohya("lora_unet_", DIFFUSERS)},  # musubi-tuner
        "comfyui": {"transformer": peft("diffusion_model.", DIFFUSERS, "comfyui")},  # ai-toolkit
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS)},
    },
    # All three load exactly in diffusers 0.42 (its Qwen converter takes diffusion_model. and
    # lora_unet_ keys, alphas folded) and in ComfyUI; ai-toolkit's layout is the commonest
    # download and needs no metadata.
    default_format="comfyui",
    identity=Identity(
        "qwen_image", "Qwen-Image/lora", "https://github.com/QwenLM/Qwen-Image", "1328x1328",
        ss_aliases=("qwen_image", "qwen-image", "qwenimage"), modelspec_aliases=("qwen-image", "qwen_image"),
        base_models=("qwen-image", "qwen_image", "qwenimage"),
        # musubi-tuner's values; "Qwen-Image/lora" names no variant (OneTrainer writes it for all)
        variant_names={
            "qwen-image-edit": ("Qwen-Image-Edit/lora",),
            "qwen-image-edit-2509": ("Qwen-Image-Edit-Plus/lora", "Qwen-Image-Edit-2509/lora"),
            "qwen-image-edit-2511": ("Qwen-Image-Edit-2511/lora",),
            "qwen-image-2512": ("Qwen-Image-2512/lora",),
            "qwen-image-layered": ("Qwen-Image-Layered/lora",),
        },
    ),
    blocks=TransformerBlocks({"joint": "transformer_blocks"}, aliases={"double": "joint", "block": "joint"}),
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
               "QwenImageEditPipeline", "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline",
               "QwenImageLayeredPipeline", "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline"),
    unsupported=(Unsupported("text encoder (Qwen2.5-VL)",
                             ("text_encoder.", "lora_te_", "lora_te1_", "text_encoders."),
                             "OneTrainer's text-encoder LoRAs, which diffusers never loads"),),
    clients={
        # its converter takes ai-toolkit's diffusion_model. and musubi's lora_unet_ files to the same
        # modules, alpha folded (tests/test_arch_qwen.py); DiffSynth's .default. and bare files
        # (converted only when they carry .alpha) are not modelled
        "diffusers": ClientFacts("dit", names={"transformer": (
            peft("diffusion_model.", DIFFUSERS, "comfyui"), kohya("lora_unet_", DIFFUSERS))}),
        # QwenImage's native names are diffusers': its branch adds them bare, under transformer. and
        # flattened under lycoris_ (ComfyUI does not read DiffSynth's .default. spelling)
        "comfyui": ClientFacts("comfyui", names={"transformer": (
            peft("", DIFFUSERS), peft("transformer.", DIFFUSERS), Naming("lycoris_", DIFFUSERS, flat=True))}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
