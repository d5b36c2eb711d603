"""Module-name grammar: kohya's flattened names, and the sgm ↔ diffusers UNet block names.

kohya flattens a module path by replacing every "." with "_", which is ambiguous because
attribute names contain "_" themselves ("to_q", "transformer_blocks"). We invert it with a
vocabulary of the attribute names that contain "_" in the model families we know: at each
position, take the longest run of tokens that forms a known name, else a single token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Attribute names containing "_" in diffusers, sgm/LDM, BFL Flux, CLIP and T5 modules.
_VOCAB = {
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
    "to_out", "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
    "time_emb_proj", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "class_embedding", "cond_proj", "time_proj",
    # sgm / LDM UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP text models (HF naming)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    # diffusers DiT (Flux, SD3)
    "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff_context", "norm1_context", "proj_mlp", "norm_out", "x_embedder", "context_embedder",
    "time_text_embed", "timestep_embedder", "guidance_embedder", "text_embedder", "pos_embed",
    "norm_q", "norm_k", "norm_added_q", "norm_added_k",
    # BFL Flux
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod",
    "txt_mod", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer",
    "out_layer", "final_layer", "adaLN_modulation",
    # T5
    "wi_0", "wi_1", "relative_attention_bias",
}
_MAX_TOKENS = max(len(v.split("_")) for v in _VOCAB)


def unflatten(flat: str) -> str:
    """'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q' → dotted module path."""
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_TOKENS, len(tokens) - i), 0, -1):
            candidate = "_".join(tokens[i : i + n])
            if n == 1 or candidate in _VOCAB:
                parts.append(candidate)
                i += n
                break
    return ".".join(parts)


def flatten(dotted: str) -> str:
    return dotted.replace(".", "_")


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
_BLOCK_INDEX = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def template(name: str, keep_block_index: bool = True) -> str:
    """A module name with its layer numbers replaced by '#'.

    Models of one family at any width share templates; keeping the index of UNet down/up
    blocks tells SD1 (attention in down block 0) from SDXL (attention in up block 0).
    """
    match = _BLOCK_INDEX.match(name) if keep_block_index else None
    rest = name[match.end() - 1 :] if match else name
    rest = _NUMBER.sub("#", rest)
    return f"{match.group(1)}.{match.group(2)}{rest}" if match else rest


# ---------------------------------------------------------------------------------------------
# sgm/LDM ↔ diffusers UNet names (the table in the field notes; layers_per_block = 2 in every
# SD1/SD2/SDXL UNet, so an sgm block index i·3+j+1 is layer j of down block i).

_RESNET_SGM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFFUSERS.items()}
_TOP_SGM_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFFUSERS_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFFUSERS.items()}
_ATTENTION_PARTS = ("transformer_blocks", "proj_in", "proj_out", "norm")


@dataclass(frozen=True)
class UnetLayout:
    """Which up blocks hold attentions: decides where an upsampler sits in sgm naming."""

    up_blocks_with_attention: tuple[int, ...]
    layers_per_block: int = 2


def is_sgm_name(name: str) -> bool:
    return name.split(".", 1)[0] in {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}


def _resnet_inner(inner: str, to_diffusers: bool) -> str:
    table = _RESNET_SGM_TO_DIFFUSERS if to_diffusers else _RESNET_DIFFUSERS_TO_SGM
    for src, dst in table.items():
        if inner == src or inner.startswith(src + "."):
            return dst + inner[len(src) :]
    return inner


def sgm_to_diffusers(name: str, layers_per_block: int = 2) -> str:
    """'input_blocks.4.1.transformer_blocks.0.attn1.to_q' → 'down_blocks.1.attentions.0.…'."""
    for src, dst in _TOP_SGM_TO_DIFFUSERS.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    parts = name.split(".")
    stride = layers_per_block + 1
    if parts[0] == "input_blocks" and len(parts) >= 3:
        k, slot, inner = int(parts[1]), parts[2], ".".join(parts[3:])
        if k % stride == 0:  # input_blocks.{3(i+1)}.0.op is the downsampler of block i
            return f"down_blocks.{k // stride - 1}.downsamplers.0." + inner.replace("op", "conv", 1)
        block, layer = (k - 1) // stride, (k - 1) % stride
        if slot == "0":
            return f"down_blocks.{block}.resnets.{layer}." + _resnet_inner(inner, True)
        return f"down_blocks.{block}.attentions.{layer}." + inner
    if parts[0] == "middle_block" and len(parts) >= 2:
        k, inner = int(parts[1]), ".".join(parts[2:])
        if k == 1:
            return "mid_block.attentions.0." + inner
        return f"mid_block.resnets.{k // 2}." + _resnet_inner(inner, True)
    if parts[0] == "output_blocks" and len(parts) >= 3:
        k, slot, inner = int(parts[1]), parts[2], ".".join(parts[3:])
        block, layer = k // stride, k % stride
        if slot == "0":
            return f"up_blocks.{block}.resnets.{layer}." + _resnet_inner(inner, True)
        if inner.split(".", 1)[0] in _ATTENTION_PARTS:
            return f"up_blocks.{block}.attentions.{layer}." + inner
        return f"up_blocks.{block}.upsamplers.0." + inner
    raise ValueError(f"not an sgm UNet module name: {name}")


def diffusers_to_sgm(name: str, layout: UnetLayout) -> str:
    """Inverse of :func:`sgm_to_diffusers` (needs to know which up blocks have attentions)."""
    for src, dst in _TOP_DIFFUSERS_TO_SGM.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    parts = name.split(".")
    stride = layout.layers_per_block + 1
    if parts[0] == "down_blocks":
        block, kind, idx, inner = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{stride * (block + 1)}.0." + inner.replace("conv", "op", 1)
        k = stride * block + idx + 1
        if kind == "resnets":
            return f"input_blocks.{k}.0." + _resnet_inner(inner, False)
        return f"input_blocks.{k}.1." + inner
    if parts[0] == "mid_block":
        kind, idx, inner = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return "middle_block.1." + inner
        return f"middle_block.{2 * idx}." + _resnet_inner(inner, False)
    if parts[0] == "up_blocks":
        block, kind, idx, inner = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            slot = 2 if block in layout.up_blocks_with_attention else 1
            return f"output_blocks.{stride * block + stride - 1}.{slot}." + inner
        k = stride * block + idx
        if kind == "resnets":
            return f"output_blocks.{k}.0." + _resnet_inner(inner, False)
        return f"output_blocks.{k}.1." + inner
    raise ValueError(f"not a diffusers UNet module name: {name}")
