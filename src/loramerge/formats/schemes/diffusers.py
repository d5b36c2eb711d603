"""Canonical names: diffusers module paths for denoisers, transformers' for text encoders.

Older files spell some of them differently; each fix below rewrites one such spelling.
"""

from __future__ import annotations

import re

from . import Identity

_OLD_TEXT_PROJ = re.compile(r"\.self_attn\.to_(q|k|v|out)$")


def drop_processor(name: str) -> str | None:
    """Old diffusers attention processors: 'attn1.processor.to_q' → 'attn1.to_q'."""
    return name.replace(".processor.", ".") if ".processor." in name else None


def to_out_zero(name: str) -> str | None:
    """'attn.to_out' (old processors) is the Linear 'attn.to_out.0'."""
    return name + ".0" if name.endswith(".to_out") else None


def both_old_spellings(name: str) -> str | None:
    fixed = drop_processor(name)
    return to_out_zero(fixed) if fixed else None


def text_model_prefix(name: str) -> str | None:
    """transformers ≥ 5 drops CLIPTextModel's 'text_model.' level; canonical names keep it."""
    return "text_model." + name if name.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")) else None


def old_text_projection(name: str) -> str | None:
    """Old diffusers text-encoder LoRAs: 'self_attn.to_q' → 'self_attn.q_proj'."""
    match = _OLD_TEXT_PROJ.search(name)
    if not match:
        return None
    fixed = name[: match.start()] + f".self_attn.{match.group(1)}_proj"
    return text_model_prefix(fixed) or fixed


DIFFUSERS = Identity("diffusers", (drop_processor, to_out_zero, both_old_spellings))
HF_TEXT = Identity("hf", (text_model_prefix, old_text_projection))
