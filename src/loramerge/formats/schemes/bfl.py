"""Black Forest Labs' Flux.1 names (original checkpoints, kohya sd-scripts, ComfyUI) ↔ diffusers,
and Chroma's (Flux.1's blocks without modulation Linears, plus its distilled guidance layer).

BFL fuses projections: a double block's ``img_attn.qkv`` holds q, k, v stacked along the
output rows; a single block's ``linear1`` holds q, k, v and the MLP input (rows 1:1:1:mlp_ratio).
The final modulation emits (shift, scale) where diffusers' ``norm_out.linear`` emits (scale, shift).
"""

from __future__ import annotations

from . import Rule, RuleScheme

_DOUBLE = "double_blocks.{i}."
_T = "transformer_blocks.{i}."
_SINGLE = "single_blocks.{i}."
_S = "single_transformer_blocks.{i}."


def double_attention_rules() -> list[Rule]:
    """A double block's fused q, k, v and output projections (Flux.1, Chroma and Flux.2 alike)."""
    return [
        Rule(_DOUBLE + "img_attn.qkv", (_T + "attn.to_q", _T + "attn.to_k", _T + "attn.to_v")),
        Rule(_DOUBLE + "img_attn.proj", (_T + "attn.to_out.0",)),
        Rule(_DOUBLE + "txt_attn.qkv", (_T + "attn.add_q_proj", _T + "attn.add_k_proj", _T + "attn.add_v_proj")),
        Rule(_DOUBLE + "txt_attn.proj", (_T + "attn.to_add_out",)),
    ]


def double_block_rules() -> list[Rule]:
    return double_attention_rules() + [
        Rule(_DOUBLE + "img_mlp.0", (_T + "ff.net.0.proj",)),
        Rule(_DOUBLE + "img_mlp.2", (_T + "ff.net.2",)),
        Rule(_DOUBLE + "img_mod.lin", (_T + "norm1.linear",)),
        Rule(_DOUBLE + "txt_mlp.0", (_T + "ff_context.net.0.proj",)),
        Rule(_DOUBLE + "txt_mlp.2", (_T + "ff_context.net.2",)),
        Rule(_DOUBLE + "txt_mod.lin", (_T + "norm1_context.linear",)),
    ]


def single_block_rules(mlp_ratio: int = 4) -> list[Rule]:
    return [
        Rule(_SINGLE + "linear1", (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
             (1, 1, 1, mlp_ratio)),
        Rule(_SINGLE + "linear2", (_S + "proj_out",)),
        Rule(_SINGLE + "modulation.lin", (_S + "norm.linear",)),
    ]


def global_rules(guidance: bool = True) -> list[Rule]:
    rules = [
        Rule("img_in", ("x_embedder",)),
        Rule("txt_in", ("context_embedder",)),
        Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    if guidance:
        rules += [
            Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    return rules


def approximator_rules() -> list[Rule]:
    """Chroma's distilled guidance layer (the modulation approximator): MLP layers renamed."""
    g = "distilled_guidance_layer."
    return [
        Rule(g + "in_proj", (g + "in_proj",)),
        Rule(g + "out_proj", (g + "out_proj",)),
        Rule(g + "layers.{i}.in_layer", (g + "layers.{i}.linear_1",)),
        Rule(g + "layers.{i}.out_layer", (g + "layers.{i}.linear_2",)),
    ]


BFL = RuleScheme("bfl", double_block_rules() + single_block_rules() + global_rules())
# Chroma has no modulation Linears (the key tables have none, so those rules never place) and
# no final adaLN; names are otherwise Flux.1's.
CHROMA = RuleScheme("bfl-chroma", double_block_rules() + single_block_rules() + global_rules(guidance=False)
                    + approximator_rules())
