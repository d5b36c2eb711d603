"""Stability's MMDiT names (SD3/SD3.5 original checkpoints, ComfyUI, kohya sd-scripts) ↔ diffusers.

Each joint block has an image stream (``x_block``) and a text stream (``context_block``) whose
attention q, k, v are fused in one ``qkv`` Linear; SD3.5 medium's MMDiT-X adds ``x_block.attn2``.
The final modulation, and the last block's context modulation (2 chunks instead of 6), emit
(shift, scale) where diffusers' AdaLayerNormContinuous emits (scale, shift).
"""

from __future__ import annotations

from . import Rule, RuleScheme

_J = "joint_blocks.{i}."
_T = "transformer_blocks.{i}."


def _qkv(stream: str, attn: str, members: tuple[str, str, str]) -> Rule:
    return Rule(f"{_J}{stream}.{attn}.qkv", tuple(_T + m for m in members))


MMDIT = RuleScheme("mmdit", [
    _qkv("x_block", "attn", ("attn.to_q", "attn.to_k", "attn.to_v")),
    Rule(_J + "x_block.attn.proj", (_T + "attn.to_out.0",)),
    _qkv("x_block", "attn2", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    Rule(_J + "x_block.attn2.proj", (_T + "attn2.to_out.0",)),
    Rule(_J + "x_block.mlp.fc1", (_T + "ff.net.0.proj",)),
    Rule(_J + "x_block.mlp.fc2", (_T + "ff.net.2",)),
    Rule(_J + "x_block.adaLN_modulation.1", (_T + "norm1.linear",)),
    _qkv("context_block", "attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    Rule(_J + "context_block.attn.proj", (_T + "attn.to_add_out",)),
    Rule(_J + "context_block.mlp.fc1", (_T + "ff_context.net.0.proj",)),
    Rule(_J + "context_block.mlp.fc2", (_T + "ff_context.net.2",)),
    Rule(_J + "context_block.adaLN_modulation.1", (_T + "norm1_context.linear",), swap_halves=2),
    Rule("x_embedder.proj", ("pos_embed.proj",)),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
])
