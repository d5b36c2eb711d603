"""HunyuanVideo 1.0 (T2V, I2V 16-channel token-replace, I2V 33-channel): HunyuanVideoTransformer3DModel.

Files name it in Tencent's spelling (fused ``img_attn_qkv``/``txt_attn_qkv``/``linear1``/refiner
``self_attn_qkv``, split exactly on reading) or in diffusers'. T2V and I2V-16ch have the same
modules and shapes, so the variant stays undetermined unless the header names it.

Formats written:
- ``comfyui`` (default): ``diffusion_model.`` + Tencent names (ComfyUI's spelling of the MLP
  embedders, ``time_in.in_layer``…), lora_A/lora_B with the scale folded, ``diff_b`` biases:
  exact in ComfyUI. diffusers 0.42 converts the same file (it triggers on ``img_attn_qkv``) and
  is exact on every block, the final ``proj_out``, ``img_in``, ``vector_in`` and the token
  refiner's other projections, but: it chunks the refiner ``self_attn_qkv`` down factor in
  three along the rank (crash, or a rank mismatch), swaps the rank halves of the final
  ``adaLN_modulation`` down factor along with the up rows (a wrong ΔW), splits ``linear1``
  at Flux's fixed 3072 and does not know ComfyUI's embedder spelling (those modules are
  dropped). No single file is exact in both for those modules; the blocks, which is what
  the trainers target, are.
- ``kohya``: musubi-tuner's ``lora_unet_`` + flattened Tencent names, one ``.alpha`` (ComfyUI
  maps its ``img_mlp_fc1``/``img_mod_linear`` spellings only partly; diffusers refuses it).
- ``diffusers``: ``transformer.`` + diffusers names (diffusers exact).
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.hunyuan import HUNYUAN, HUNYUAN_COMFY, HUNYUAN_COMFY_MODEL
from . import Architecture, ClientFacts, Identity
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, dit_formats, peft


def transformer(in_channels: int = 16, guidance: bool = True, condition: str | None = None) -> dict:
    return {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": in_channels, "out_channels": 16,
            "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40,
            "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm",
            "guidance_embeds": guidance, "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
            "rope_axes_dim": [16, 56, 56], "image_condition_type": condition}


ARCH = Architecture(
    name="hunyuanvideo",
    label="HunyuanVideo",
    denoiser="transformer",
    components=(
        dit_denoiser(HUNYUAN, extra=(
            peft("diffusion_model.", HUNYUAN_COMFY, "comfyui"),
            peft("transformer.", HUNYUAN, "diffusion-pipe"),  # diffusion-pipe: Tencent names under transformer.
        )),
    ),
    variants={
        "hunyuanvideo": {"transformer": transformer()},
        "hunyuanvideo-i2v": {"transformer": transformer(condition="token_replace")},
        "hunyuanvideo-i2v-33ch": {"transformer": transformer(33, guidance=False, condition="latent_concat")},
    },
    formats=dit_formats(HUNYUAN, HUNYUAN_COMFY),
    default_format="comfyui",
    identity=Identity("hunyuan_video", "hunyuan-video/lora", "https://github.com/Tencent/HunyuanVideo", "1280x720",
                      ss_aliases=("hunyuan_video", "hunyuan-video", "hunyuanvideo", "hyvideo"),
                      modelspec_aliases=("hunyuan-video", "hunyuanvideo", "hunyuan_video"),
                      base_models=("hunyuanvideo", "hunyuan-video", "hunyuan_video")),
    blocks=TransformerBlocks({"double": "transformer_blocks", "single": "single_transformer_blocks",
                              "refiner": "context_embedder.token_refiner.refiner_blocks"}),
    pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
    clients={
        # transformer. PEFT files only: the Tencent-name converter (runs on any img_attn_qkv key)
        # has the faults listed above, and files without that key are not converted — not modelled
        "diffusers": ClientFacts("dit"),
        # ComfyUI's own model has Flux-style names (generic candidates); its HunyuanVideo branch maps
        # the Tencent names (ComfyUI's embedder spelling) under transformer. and diffusion_model.
        "comfyui": ClientFacts("comfyui", native=HUNYUAN_COMFY_MODEL, names={"transformer": (
            peft("transformer.", HUNYUAN_COMFY), peft("diffusion_model.", HUNYUAN_COMFY))}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
