"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V, TI2V; 1.3B, 5B, 14B, A14B): WanTransformer3DModel.

Wan 2.2 A14B has two experts of the 14B shape: ``transformer`` (high noise) and
``transformer_2`` (low noise). Most LoRA files hold one expert and name it like any Wan model,
so they read as ``transformer``; only ai-toolkit's combined files (``diffusion_model.
transformer_1.`` / ``diffusion_model.transformer_2.``) and diffusers-named ``transformer_2.``
keys say which expert. Shapes cannot tell Wan 2.1 T2V-14B from either 2.2 A14B expert, 2.1
I2V 480P from 720P from FLF2V, so those are variants of this one entry and the variant stays
undetermined unless the file's header names it.

Formats written:
- ``comfyui`` (default): ``diffusion_model.`` + Wan's own names, lora_A/lora_B with the scale
  folded, bias deltas as ``diff_b``: what ComfyUI, ai-toolkit and diffusion-pipe read and write,
  and what diffusers 0.42 converts exactly (``_convert_non_diffusers_wan_lora_to_diffusers``)
  — except LoRAs on ``patch_embedding`` (its converter has no rule and raises) and a file
  with ``k_img`` but no ``v_img`` (it maps the pair only when both occur). A ``transformer_2``
  part is written under ``diffusion_model.transformer_2.`` (ComfyUI loads the high-noise part
  and reports the rest unloaded; diffusers refuses such a file).
- ``kohya``: musubi-tuner's ``lora_unet_`` + flattened Wan names, one ``.alpha`` (ComfyUI
  exact; diffusers' musubi converter only when every block holds every projection — ten,
  twelve with the image branch — and nothing outside the blocks). One expert per file:
  ``transformer_2`` modules are refused.
- ``diffusers``: ``transformer.`` / ``transformer_2.`` + diffusers names and
  ``lora_adapter_metadata`` (diffusers exact; the low-noise part loads with
  ``pipe.transformer_2.load_lora_adapter(sd, prefix="transformer_2")``).
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from ..schemes.wan import WAN
from . import Architecture, ClientFacts, Component, Identity, Naming
from ._clients import A1111_NONE, FORGE_NONE
from ._common import comfyui, dit_denoiser, dit_formats, peft


def transformer(heads: int, ffn: int, layers: int, in_channels: int = 16, out_channels: int = 16,
                image: bool = False, pos_embed_seq_len: int | None = None) -> dict:
    dim = heads * 128
    return {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": heads,
            "attention_head_dim": 128, "in_channels": in_channels, "out_channels": out_channels, "text_dim": 4096,
            "freq_dim": 256, "ffn_dim": ffn, "num_layers": layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": 1280 if image else None,
            "added_kv_proj_dim": dim if image else None, "rope_max_seq_len": 1024,
            "pos_embed_seq_len": pos_embed_seq_len}


T2V_14B = transformer(40, 13824, 40)
I2V_14B = transformer(40, 13824, 40, in_channels=36, image=True)
I2V_A14B = transformer(40, 13824, 40, in_channels=36)  # Wan 2.2 I2V has no image cross-attention

FORMATS, COMFY_2 = dit_formats(WAN), comfyui("diffusion_model.transformer_2.", WAN)

ARCH = Architecture(
    name="wan",
    label="Wan 2.1 / 2.2",
    denoiser="transformer",
    experts=("transformer_2",),
    components=(
        dit_denoiser(WAN, extra=(
            Naming("lora_unet__", WAN, flat=True, label="videox-fun"),  # VideoX-Fun: double underscore
            peft("", WAN, "diffsynth"),  # DiffSynth-Studio: bare Wan names (lora_A.default.weight)
            peft("diffusion_model.transformer_1.", WAN, "ai-toolkit"),  # combined Wan 2.2 file, high noise
        ), single_file_prefixes=("model.diffusion_model.", "diffusion_model.", "")),
        Component("transformer_2", (peft("transformer_2.", DIFFUSERS), COMFY_2)),
    ),
    variants={
        "wan2.1-t2v-1.3b": {"transformer": transformer(12, 8960, 30)},
        "wan2.1-t2v-14b": {"transformer": T2V_14B},
        "wan2.1-i2v-14b-480p": {"transformer": I2V_14B},
        "wan2.1-i2v-14b-720p": {"transformer": I2V_14B},
        "wan2.1-flf2v-14b": {"transformer": transformer(40, 13824, 40, in_channels=36, image=True,
                                                        pos_embed_seq_len=514)},
        "wan2.2-ti2v-5b": {"transformer": transformer(24, 14336, 30, in_channels=48, out_channels=48)},
        "wan2.2-t2v-a14b": {"transformer": T2V_14B, "transformer_2": T2V_14B},
        "wan2.2-i2v-a14b": {"transformer": I2V_A14B, "transformer_2": I2V_A14B},
    },
    formats={**FORMATS, "comfyui": {**FORMATS["comfyui"], "transformer_2": COMFY_2},
             "diffusers": {**FORMATS["diffusers"], "transformer_2": peft("transformer_2.", DIFFUSERS)}},
    default_format="comfyui",
    # musubi-tuner writes modelspec.architecture "wan2.1/lora" for every Wan task (2.2 too)
    identity=Identity("wan", "wan2.1/lora", "https://github.com/Wan-Video/Wan2.1", "832x480",
                      ss_aliases=("wan",), modelspec_aliases=("wan2.1", "wan2.2", "wan-", "wan/"),
                      base_models=("wan2.1", "wan2.2", "wan-ai/wan")),
    blocks=TransformerBlocks({"block": "blocks"}),
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    clients={
        # transformer. PEFT files only: the diffusion_model. converter (patch_embedding raises, k_img
        # only with v_img, diff_b → lora_B.bias) and the musubi one (every block needs every
        # projection) are not modelled; transformer_2 files are reported unknown
        "diffusers": ClientFacts("dit"),
        # generic Wan names only (diffusers-named files have no candidate, notes §1.2), plus VideoX-Fun's
        # lora_unet__, which convert_lora rewrites to lora_unet_ first; the high-noise model only
        "comfyui": ClientFacts("comfyui", names={"transformer": (Naming("lora_unet__", WAN, flat=True),)}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
