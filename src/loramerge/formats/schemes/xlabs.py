"""XLabs (x-flux) Flux.1 LoRAs ↔ diffusers.

x-flux trains LoRA attention processors beside BFL's layers: a double block's
``processor.qkv_lora1`` (image) / ``qkv_lora2`` (text) parallel ``img_attn.qkv`` / ``txt_attn.qkv``
(q, k, v stacked), ``proj_lora1`` / ``proj_lora2`` the output projections; a single block's
``processor.qkv_lora`` holds only the q, k, v rows of ``linear1`` (not the MLP input) and
``proj_lora`` parallels ``linear2``. Keys end ``.down.weight`` / ``.up.weight``; the single-block
``qkv_lora.down.weight`` reads as module ``processor.qkv`` (the old diffusers ``_lora.down``
spelling), so the names below are the module prefixes as keys split.
"""

from __future__ import annotations

from . import Rule, RuleScheme

_D = "double_blocks.{i}.processor."
_T = "transformer_blocks.{i}."
_S = "single_blocks.{i}.processor."
_ST = "single_transformer_blocks.{i}."

XLABS = RuleScheme("xlabs", [
    Rule(_D + "qkv_lora1", (_T + "attn.to_q", _T + "attn.to_k", _T + "attn.to_v")),
    Rule(_D + "qkv_lora2", (_T + "attn.add_q_proj", _T + "attn.add_k_proj", _T + "attn.add_v_proj")),
    Rule(_D + "proj_lora1", (_T + "attn.to_out.0",)),
    Rule(_D + "proj_lora2", (_T + "attn.to_add_out",)),
    Rule(_S + "qkv", (_ST + "attn.to_q", _ST + "attn.to_k", _ST + "attn.to_v")),
    Rule(_S + "proj", (_ST + "proj_out",)),
])
