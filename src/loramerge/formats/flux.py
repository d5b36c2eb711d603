"""Flux: BFL module names (what kohya sd-scripts and ComfyUI write) ↔ diffusers module names.

BFL fuses some projections into one Linear: a double block's ``img_attn.qkv`` holds q, k, v
stacked along the output dim, and a single block's ``linear1`` holds q, k, v and the MLP input
(out sizes 1:1:1:4, Flux's mlp_ratio is 4). A fused LoRA maps to separate diffusers modules
by splitting its up factor by rows and sharing its down factor; the reverse stacks them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Inside double_blocks.{i}: BFL name → diffusers names under transformer_blocks.{i}.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# Inside single_blocks.{i}: BFL name → diffusers names under single_transformer_blocks.{i}.
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
# Outside the blocks.
GLOBAL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# Relative output sizes of the members of a fused module.
SPLIT_RATIOS = {3: (1, 1, 1), 4: (1, 1, 1, 4)}
# BFL's final modulation emits (shift, scale); diffusers' norm_out.linear emits (scale, shift).
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}


@dataclass(frozen=True)
class FusedTarget:
    """One BFL module and the diffusers modules it holds, in row order."""

    bfl_name: str
    members: tuple[str, ...]
    swap_halves: bool = False

    @property
    def ratios(self) -> tuple[int, ...]:
        return SPLIT_RATIOS.get(len(self.members), (1,))


def is_bfl_name(name: str) -> bool:
    head = name.split(".", 1)[0]
    return head in {"double_blocks", "single_blocks", "final_layer"} or any(
        name == g or name.startswith(g + ".") for g in GLOBAL
    )


def bfl_target(bfl_name: str) -> FusedTarget:
    """The diffusers modules held by one BFL module, e.g. 'double_blocks.3.img_attn.qkv'."""
    parts = bfl_name.split(".")
    if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2:
        table = DOUBLE_BLOCK if parts[0] == "double_blocks" else SINGLE_BLOCK
        prefix = "transformer_blocks" if parts[0] == "double_blocks" else "single_transformer_blocks"
        inner = ".".join(parts[2:])
        if inner in table:
            members = tuple(f"{prefix}.{parts[1]}.{m}" for m in table[inner])
            return FusedTarget(bfl_name, members)
    if bfl_name in GLOBAL:
        return FusedTarget(bfl_name, GLOBAL[bfl_name], bfl_name in SWAPPED_HALVES)
    raise KeyError(bfl_name)


def _reverse_table() -> dict[str, tuple[str, int]]:
    """diffusers member pattern → (BFL pattern, position), '{i}' standing for the block index."""
    reverse: dict[str, tuple[str, int]] = {}
    for table, bfl_prefix, dif_prefix in (
        (DOUBLE_BLOCK, "double_blocks", "transformer_blocks"),
        (SINGLE_BLOCK, "single_blocks", "single_transformer_blocks"),
    ):
        for bfl, members in table.items():
            for pos, member in enumerate(members):
                reverse[f"{dif_prefix}.{{i}}.{member}"] = (f"{bfl_prefix}.{{i}}.{bfl}", pos)
    for bfl, members in GLOBAL.items():
        reverse[members[0]] = (bfl, 0)
    return reverse


_REVERSE = _reverse_table()


def diffusers_to_bfl(name: str) -> tuple[FusedTarget, int]:
    """The BFL module holding a diffusers module, and the member position inside it."""
    parts = name.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
        key = ".".join([parts[0], "{i}"] + parts[2:])
        if key in _REVERSE:
            bfl, pos = _REVERSE[key]
            return bfl_target(bfl.replace("{i}", parts[1])), pos
    elif name in _REVERSE:
        bfl, pos = _REVERSE[name]
        return bfl_target(bfl), pos
    raise KeyError(name)
