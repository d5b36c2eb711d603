"""Black Forest Labs' Flux.2 names (original checkpoints, musubi-tuner, ai-toolkit, ComfyUI) ↔ diffusers.

Like Flux.1, a double block's ``img_attn.qkv``/``txt_attn.qkv`` stack q, k, v along the output
rows (diffusers splits them). Unlike Flux.1, the SwiGLU MLP input (gate‖value) stays one Linear in
diffusers (``ff.linear_in``), a single block's ``linear1`` is diffusers' fused
``attn.to_qkv_mlp_proj`` and ``linear2`` its ``attn.to_out`` (both 1:1), and the modulations are
three global Linears (no per-block ``*_mod.lin``). The final modulation emits (shift, scale) where
diffusers' ``norm_out.linear`` emits (scale, shift).
"""

from __future__ import annotations

from . import Rule, RuleScheme
from .bfl import double_attention_rules

_D = "double_blocks.{i}."
_T = "transformer_blocks.{i}."
_ST = "single_transformer_blocks.{i}."

FLUX2 = RuleScheme("bfl-flux2", double_attention_rules() + [
    Rule(_D + "img_mlp.0", (_T + "ff.linear_in",)),
    Rule(_D + "img_mlp.2", (_T + "ff.linear_out",)),
    Rule(_D + "txt_mlp.0", (_T + "ff_context.linear_in",)),
    Rule(_D + "txt_mlp.2", (_T + "ff_context.linear_out",)),
    Rule("single_blocks.{i}.linear1", (_ST + "attn.to_qkv_mlp_proj",)),
    Rule("single_blocks.{i}.linear2", (_ST + "attn.to_out",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    Rule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    Rule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    Rule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
])
