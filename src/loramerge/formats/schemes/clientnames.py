"""Spellings only some clients use, as schemes over the canonical names (for the architectures'
client facts, :class:`..archs.ClientFacts`).

- :class:`Only`: another scheme restricted to some canonical names (ComfyUI maps the
  ``lora_teN_`` / ``text_encoder.`` spellings of a CLIP encoder only for the six projections of
  each layer, and the projection only as ``lora_te2_text_projection``).
- :data:`PROCESSOR`: the old diffusers attention-processor spelling, the only dotted diffusers
  spelling ComfyUI and Forge map for SD UNets (``attn1.to_q`` → ``attn1.processor.to_q``,
  ``attn1.to_out.0`` → ``attn1.processor.to_out``).
- :data:`A1111_OPENCLIP`: how A1111 files the LoRA modules of an OpenCLIP text encoder: q, k, v
  under the layer's ``MultiheadAttention`` with their own suffix, out and the MLP under their
  own modules (``transformer.resblocks.3.attn.q_proj``, ``….attn.out_proj``, ``….mlp.c_fc``).
"""

from __future__ import annotations

import re

from . import Rule, RuleScheme, Scheme, Target

CLIP_LAYER_MODULES = r"text_model\.encoder\.layers\.([0-9]|[12][0-9]|3[01])\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


class Only(Scheme):
    """``scheme`` for the canonical names that fully match ``pattern`` (a regex), nothing else."""

    def __init__(self, scheme: Scheme, pattern: str):
        self.scheme = scheme
        self.pattern = re.compile(pattern)
        self.name = f"{scheme.name}[{pattern}]"

    def _mine(self, target: Target | None) -> bool:
        return target is not None and all(self.pattern.fullmatch(m) for m in target.members)

    def decode(self, name: str) -> Target | None:
        target = self.scheme.decode(name)
        return target if self._mine(target) else None

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        if not self.pattern.fullmatch(canonical):
            return None
        return self.scheme.encode(canonical)


class Processor(Scheme):
    """diffusers names with attention projections in the old processor spelling."""

    name = "diffusers-processor"
    _OUT = re.compile(r"\.processor\.to_out$")

    def decode(self, name: str) -> Target | None:
        if ".to_" in name and ".processor.to_" not in name:
            return None  # the rewrite is applied to every '.to_': a plain one is not this spelling
        canonical = self._OUT.sub(".to_out.0", name).replace(".processor.to_", ".to_")
        return Target(name, (canonical,))

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        name = canonical.replace(".to_", ".processor.to_")
        if name.endswith(".processor.to_out.0"):
            name = name[: -len(".0")]
        return Target(name, (canonical,)), 0


PROCESSOR = Processor()

_L = "text_model.encoder.layers.{i}."
_R = "transformer.resblocks.{i}."
A1111_OPENCLIP = RuleScheme("a1111-openclip", [
    *(Rule(f"{_R}attn.{x}_proj", (f"{_L}self_attn.{x}_proj",)) for x in ("q", "k", "v", "out")),
    Rule(_R + "mlp.c_fc", (_L + "mlp.fc1",)),
    Rule(_R + "mlp.c_proj", (_L + "mlp.fc2",)),
])
# the modules of one OpenCLIP layer A1111 applies together or not at all
OPENCLIP_ATTENTION = tuple(f"{_L}self_attn.{x}_proj" for x in ("q", "k", "v", "out"))


def layer_groups(templates: tuple[str, ...], items) -> dict[str, dict[int, object]]:
    """Group (canonical name, item) pairs by the layer ``{i}`` a template gives them:
    {layer: {template position: item}} (a ClientFacts ``together`` group per layer)."""
    patterns = [re.compile(re.escape(t).replace(r"\{i\}", r"(\d+)") + "$") for t in templates]
    groups: dict[str, dict[int, object]] = {}
    for name, item in items:
        for position, pattern in enumerate(patterns):
            hit = pattern.match(name)
            if hit:
                groups.setdefault(hit.group(1), {})[position] = item
    return groups
