"""LDM / sgm UNet names (what SD1/SD2/SDXL single files and kohya's SDXL LoRAs use) ↔ diffusers.

The table in docs/notes (field notes): with layers_per_block = 2, input block 3i+j+1 is layer j of
down block i, input block 3(i+1) its downsampler; output block 3i+j is layer j of up block i.
Inverting needs to know which up blocks hold attentions (it moves the upsampler's slot).
"""

from __future__ import annotations

from . import Scheme, Target

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
SGM_HEADS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"})


def _swap_prefix(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def _resnet_inner(inner: str, to_diffusers: bool) -> str:
    table = _RESNET_SGM_TO_DIFFUSERS if to_diffusers else _RESNET_DIFFUSERS_TO_SGM
    return _swap_prefix(inner, table) or inner


def sgm_to_diffusers(name: str, layers_per_block: int = 2) -> str:
    """'input_blocks.4.1.transformer_blocks.0.attn1.to_q' → 'down_blocks.1.attentions.0.…'."""
    top = _swap_prefix(name, _TOP_SGM_TO_DIFFUSERS)
    if top is not None:
        return top
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


def diffusers_to_sgm(name: str, up_blocks_with_attention: tuple[int, ...], layers_per_block: int = 2) -> str:
    """Inverse of :func:`sgm_to_diffusers`."""
    top = _swap_prefix(name, _TOP_DIFFUSERS_TO_SGM)
    if top is not None:
        return top
    parts = name.split(".")
    stride = layers_per_block + 1
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
            slot = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{stride * block + stride - 1}.{slot}." + inner
        k = stride * block + idx
        if kind == "resnets":
            return f"output_blocks.{k}.0." + _resnet_inner(inner, False)
        return f"output_blocks.{k}.1." + inner
    raise ValueError(f"not a diffusers UNet module name: {name}")


class Sgm(Scheme):
    """sgm/LDM UNet names; ``up_blocks_with_attention`` places the upsamplers."""

    name = "sgm"

    def __init__(self, up_blocks_with_attention: tuple[int, ...], layers_per_block: int = 2):
        self.up_blocks_with_attention = tuple(up_blocks_with_attention)
        self.layers_per_block = layers_per_block

    def decode(self, name: str) -> Target | None:
        if name.split(".", 1)[0] not in SGM_HEADS:
            return None
        try:
            return Target(name, (sgm_to_diffusers(name, self.layers_per_block),))
        except (ValueError, IndexError):
            return None

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        try:
            sgm = diffusers_to_sgm(canonical, self.up_blocks_with_attention, self.layers_per_block)
        except (ValueError, IndexError):
            return None
        return Target(sgm, (canonical,)), 0
