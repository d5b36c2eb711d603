"""OpenCLIP text encoders as SD2 and SDXL single files store them ↔ transformers' CLIP names.

q, k, v live stacked in one ``attn.in_proj_weight``; ``text_projection`` is stored as the
matrix P of x @ P, i.e. the Linear weight transposed.
"""

from __future__ import annotations

import re

from . import Scheme, Target

_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))$")
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_SIMPLE = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


class OpenClip(Scheme):
    name = "openclip"

    def decode(self, name: str) -> Target | None:
        if name == "text_projection":
            return Target(name, ("text_projection",), transpose=True, weight_key="text_projection")
        match = _BLOCK.match(name)
        if not match:
            return None
        layer, part = match.groups()
        base = f"text_model.encoder.layers.{layer}."
        if part == "attn.in_proj":
            members = tuple(f"{base}self_attn.{x}_proj" for x in "qkv")
            return Target(name, members, (1, 1, 1), weight_key=f"{name}_weight")
        inverse = {v: k for k, v in _SIMPLE.items()}
        return Target(name, (base + inverse[part],))

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        if canonical == "text_projection":
            return self.decode("text_projection"), 0
        match = _LAYER.match(canonical)
        if not match:
            return None
        layer, part = match.group(1), match.group(2)
        block = f"transformer.resblocks.{layer}."
        if part in _SIMPLE:
            return self.decode(block + _SIMPLE[part]), 0
        return self.decode(block + "attn.in_proj"), "qkv".index(match.group(3))


OPENCLIP = OpenClip()
