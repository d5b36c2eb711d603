"""Lightricks' original names (ltx-core / LTX-Video checkpoints, ComfyUI, the LTX trainers,
ai-toolkit, diffusion-pipe) ↔ diffusers' LTX-2 and LTX-Video transformers and LTX-2's text
connectors.

Most transformer names are diffusers' already; the renames are those of diffusers'
``convert_ltx2_transformer_to_diffusers`` / ``convert_ltx_transformer_checkpoint_to_diffusers``
(``patchify_proj`` → ``proj_in``, ``adaln_single`` → ``time_embed``…). LTX-Video 0.9 uses the
subset without audio. No fused projections, no swapped halves.

LTX-2's text connectors live in two places of an original checkpoint: the 1-D transformers
inside ``diffusion_model.`` (``video_embeddings_connector.transformer_1d_blocks.N``) and the
top-level ``text_embedding_projection.`` (``aggregate_embed``); :data:`LTX2_CONNECTORS` names
them with those prefixes, so one naming (key prefix '') covers both.
"""

from __future__ import annotations

from . import Rule, RuleScheme

_ADALN_PARTS = ("linear", "emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")
_ADALN = {
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}

LTX = RuleScheme("ltx", [
    Rule("patchify_proj", ("proj_in",)),
    Rule("audio_patchify_proj", ("audio_proj_in",)),
    *(Rule(f"{original}.{part}", (f"{diffusers}.{part}",)) for original, diffusers in _ADALN.items()
      for part in _ADALN_PARTS),
], passthrough=True)

_CONNECTOR_PARTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.to_gate_logits",
                    "ff.net.0.proj", "ff.net.2")

LTX2_CONNECTORS = RuleScheme("ltx2-connectors", [
    Rule("text_embedding_projection.aggregate_embed", ("text_proj_in",)),
    Rule("text_embedding_projection.video_aggregate_embed", ("video_text_proj_in",)),
    Rule("text_embedding_projection.audio_aggregate_embed", ("audio_text_proj_in",)),
    *(Rule(f"diffusion_model.{modality}_embeddings_connector.transformer_1d_blocks.{{i}}.{part}",
           (f"{modality}_connector.transformer_blocks.{{i}}.{part}",))
      for modality in ("video", "audio") for part in _CONNECTOR_PARTS),
])
