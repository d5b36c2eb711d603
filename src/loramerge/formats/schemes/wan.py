"""Wan-Video's original names (official checkpoints, ComfyUI, musubi-tuner, ai-toolkit,
diffusion-pipe, DiffSynth, VideoX-Fun) ↔ diffusers' WanTransformer3DModel.

No fused projections and no swapped halves: every original Linear is one diffusers Linear
(diffusers ``single_file_utils.convert_wan_transformer_to_diffusers``). Norms are named too, for
the norm-weight ``.diff`` deltas Wan LoRAs carry: the original cross-attention pre-norm
``norm3`` is diffusers' ``norm2`` (the names swap; the FFN pre-norm has no weights).
"""

from __future__ import annotations

from . import Rule, RuleScheme

_B = "blocks.{i}."


def _attention(original: str, diffusers: str) -> list[Rule]:
    return [Rule(f"{_B}{original}.{o}", (f"{_B}{diffusers}.{d}",))
            for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))]


WAN = RuleScheme("wan", [
    *_attention("self_attn", "attn1"),
    *_attention("cross_attn", "attn2"),
    Rule(_B + "cross_attn.k_img", (_B + "attn2.add_k_proj",)),  # Wan 2.1 I2V / FLF2V image branch
    Rule(_B + "cross_attn.v_img", (_B + "attn2.add_v_proj",)),
    Rule(_B + "cross_attn.norm_k_img", (_B + "attn2.norm_added_k",)),
    Rule(_B + "self_attn.norm_q", (_B + "attn1.norm_q",)),
    Rule(_B + "self_attn.norm_k", (_B + "attn1.norm_k",)),
    Rule(_B + "cross_attn.norm_q", (_B + "attn2.norm_q",)),
    Rule(_B + "cross_attn.norm_k", (_B + "attn2.norm_k",)),
    Rule(_B + "norm3", (_B + "norm2",)),
    Rule(_B + "ffn.0", (_B + "ffn.net.0.proj",)),
    Rule(_B + "ffn.2", (_B + "ffn.net.2",)),
    Rule("patch_embedding", ("patch_embedding",)),
    Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("time_projection.1", ("condition_embedder.time_proj",)),
    Rule("img_emb.proj.0", ("condition_embedder.image_embedder.norm1",)),
    Rule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Rule("img_emb.proj.4", ("condition_embedder.image_embedder.norm2",)),
    Rule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
    Rule("head.head", ("proj_out",)),
])
