"""LTX-2 (2.0, 2.3, 2.5; audio-video) and LTX-Video 0.9 (2B, 13B): Lightricks' DiTs.

Two entries sharing Lightricks' naming (:mod:`..schemes.ltx`). LTX-2 has a second LoRA-loadable
component, the text ``connectors``. A LoRA on LTX-2's video branch only (``attn1``/``attn2``/
``ff`` of 48 blocks at 4096) has exactly the modules and shapes of an LTX-Video 0.9.7/0.9.8
13B LoRA: that file is ambiguous between the two architectures (only its header can tell), and
2.0 / 2.3 / 2.5 likewise stay an undetermined variant unless a 2.3-only module (gates,
``prompt_adaln``) or the header decides.

Formats written (both):
- ``comfyui`` (default): ``diffusion_model.`` + Lightricks names, lora_A/lora_B, scale folded —
  what the LTX trainers, ai-toolkit and diffusion-pipe write; ComfyUI maps them onto its model,
  diffusers converts them (LTX-2: renames, and ``text_embedding_projection.`` → connectors).
  LTX-Video 0.9: diffusers only swaps the prefix, so LoRAs on ``patchify_proj``/``adaln_single``
  do not load there (blocks do). LTX-2 connector blocks are written as
  ``diffusion_model.video_embeddings_connector.…``, which diffusers mis-routes to the transformer.
- ``kohya``: ``lora_unet_`` + flattened Lightricks names (ComfyUI's generic map; diffusers
  does not convert it); transformer only.
- ``diffusers``: ``transformer.`` (+ ``connectors.``) + diffusers names.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from ..schemes.clientnames import Only
from ..schemes.ltx import LTX, LTX2_CONNECTORS
from . import Architecture, ClientFacts, Component, Identity, Naming
from ._clients import A1111_NONE, FORGE_NONE
from ._common import comfyui, dit_denoiser, dit_formats, peft

_LTX2_COMMON = {
    "_class_name": "LTX2VideoTransformer3DModel", "in_channels": 128, "out_channels": 128, "patch_size": 1,
    "patch_size_t": 1, "num_attention_heads": 32, "attention_head_dim": 128, "cross_attention_dim": 4096,
    "vae_scale_factors": [8, 32, 32], "pos_embed_max_pos": 20, "base_height": 2048, "base_width": 2048,
    "audio_in_channels": 128, "audio_out_channels": 128, "audio_patch_size": 1, "audio_patch_size_t": 1,
    "audio_num_attention_heads": 32, "audio_attention_head_dim": 64, "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4, "audio_pos_embed_max_pos": 20, "audio_sampling_rate": 16000, "audio_hop_length": 160,
    "num_layers": 48, "activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "caption_channels": 3840, "attention_bias": True,
    "attention_out_bias": True, "rope_theta": 10000.0, "rope_double_precision": True, "causal_offset": 1,
    "timestep_scale_multiplier": 1000, "cross_attn_timestep_scale_multiplier": 1000, "rope_type": "split",
    "audio_ff_bias": True, "use_prompt_adaln_single": True,
}


def ltx2(gated: bool, ff_bias: bool = True, keyframes: bool = False) -> dict:
    return {**_LTX2_COMMON, "gated_attn": gated, "cross_attn_mod": gated, "audio_gated_attn": gated,
            "audio_cross_attn_mod": gated, "use_prompt_embeddings": not gated, "perturbed_attn": gated,
            "ff_bias": ff_bias, "use_keyframes_abs_pos_embedding": keyframes}


def connectors(heads: int, audio_head_dim: int, layers: int, gated: bool) -> dict:
    return {"_class_name": "LTX2TextConnectors", "_module": "diffusers.pipelines.ltx2.connectors",
            "caption_channels": 3840, "text_proj_in_factor": 49,
            "video_connector_num_attention_heads": heads, "video_connector_attention_head_dim": 128,
            "video_connector_num_layers": layers, "video_connector_num_learnable_registers": 128,
            "video_gated_attn": gated, "audio_connector_num_attention_heads": heads,
            "audio_connector_attention_head_dim": audio_head_dim, "audio_connector_num_layers": layers,
            "audio_connector_num_learnable_registers": 128, "audio_gated_attn": gated,
            "connector_rope_base_seq_len": 4096, "rope_theta": 10000.0, "rope_double_precision": True,
            "causal_temporal_positioning": False, "rope_type": "split", "per_modality_projections": gated,
            "video_hidden_dim": 4096, "audio_hidden_dim": 2048, "proj_bias": gated}


def ltx_video(heads: int, head_dim: int, layers: int) -> dict:
    return {"_class_name": "LTXVideoTransformer3DModel", "in_channels": 128, "out_channels": 128, "patch_size": 1,
            "patch_size_t": 1, "num_attention_heads": heads, "attention_head_dim": head_dim,
            "cross_attention_dim": heads * head_dim, "num_layers": layers, "activation_fn": "gelu-approximate",
            "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-06,
            "caption_channels": 4096, "attention_bias": True, "attention_out_bias": True}


def _transformer() -> Component:
    return dit_denoiser(LTX)


_GRAMMAR = TransformerBlocks({"block": "transformer_blocks"})


def _with(formats: dict, **connectors: Naming) -> dict:
    """``formats`` with the text connectors' naming added to the formats given."""
    return {f: {**namings, **({"connectors": connectors[f]} if f in connectors else {})} for f, namings in formats.items()}

LTX2 = Architecture(
    name="ltx2",
    label="LTX-2",
    denoiser="transformer",
    components=(
        _transformer(),
        # connector blocks sit in diffusion_model., the text projection at the top level
        Component("connectors", (peft("connectors.", DIFFUSERS), Naming("", LTX2_CONNECTORS, style="peft", label="comfyui")),
                  single_file=(Naming("model.", LTX2_CONNECTORS), Naming("", LTX2_CONNECTORS))),
    ),
    variants={
        "ltx2": {"transformer": ltx2(gated=False), "connectors": connectors(30, 128, 2, gated=False)},
        "ltx2.3": {"transformer": ltx2(gated=True), "connectors": connectors(32, 64, 8, gated=True)},
        # 2.5's connectors follow its Gemma-4 text encoder's config: no fixed full-size table
        "ltx2.5": {"transformer": ltx2(gated=True, ff_bias=False, keyframes=True)},
    },
    formats=_with(dit_formats(LTX), comfyui=comfyui("", LTX2_CONNECTORS), diffusers=peft("connectors.", DIFFUSERS)),
    default_format="comfyui",
    identity=Identity("ltx2", "ltx-2/lora", "https://github.com/Lightricks/LTX-2", "1280x704",
                      ss_aliases=("ltx2", "ltx-2", "ltx_2", "ltxv2"), modelspec_aliases=("ltx-2", "ltx2", "ltxv2"),
                      base_models=("ltx-2", "ltx2")),
    blocks=_GRAMMAR,
    pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
               "LTX2HDRPipeline"),
    clients={
        # transformer. PEFT files only: the diffusion_model. renames and the connectors are not modelled
        "diffusers": ClientFacts("dit"),
        # no LTXAV branch (notes §8): generic names. The connector blocks sit in ComfyUI's diffusion
        # model (diffusion_model.video_embeddings_connector.…); their lora_unet_ spelling has no scheme
        # here and the top-level text_embedding_projection was not read: both reported not loaded
        "comfyui": ClientFacts("comfyui", names={"connectors": (
            Naming("", Only(LTX2_CONNECTORS, r"(video|audio)_connector\..*")),)}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)

LTX_VIDEO = Architecture(
    name="ltx-video",
    label="LTX-Video 0.9",
    denoiser="transformer",
    components=(_transformer(),),
    variants={
        "ltx-video-0.9-2b": {"transformer": ltx_video(32, 64, 28)},
        "ltx-video-0.9.7-13b": {"transformer": ltx_video(32, 128, 48)},
    },
    formats=dit_formats(LTX),
    default_format="comfyui",
    identity=Identity("ltx-video", "ltx-video/lora", "https://github.com/Lightricks/LTX-Video", "768x512",
                      # not a bare "ltxv": it would also claim LTX-2's "ltxv2"
                      ss_aliases=("ltxv-0", "ltxv_0", "ltx-video", "ltx_video"),
                      modelspec_aliases=("ltx-video", "ltxv/", "ltxv-0"), base_models=("ltx-video",)),
    blocks=_GRAMMAR,
    pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    clients={
        # transformer. PEFT files only: the diffusion_model. prefix swap leaves patchify_proj and
        # adaln_single unloaded — not modelled
        "diffusers": ClientFacts("dit"),
        "comfyui": ClientFacts("comfyui"),  # generic Lightricks names only (notes §1.2)
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)

ARCHS = [LTX2, LTX_VIDEO]
