"""Tencent's HunyuanVideo (1.0) names (official checkpoints, musubi-tuner, diffusion-pipe,
ComfyUI LoRAs) ↔ diffusers' HunyuanVideoTransformer3DModel.

Fused projections (diffusers ``convert_hunyuan_video_transformer_to_diffusers``): a double
block's ``img_attn_qkv`` / ``txt_attn_qkv`` hold q, k, v stacked along the output rows; a
single block's ``linear1`` holds q, k, v and the MLP input (rows 1:1:1:mlp_ratio = 4); the
token refiner's ``self_attn_qkv`` holds q, k, v. The final modulation emits (shift, scale)
where diffusers' ``norm_out.linear`` emits (scale, shift).

ComfyUI's own model spells the MLP embedders Flux's way (``time_in.in_layer`` for Tencent's
``time_in.mlp.0``, ``txt_in.c_embedder.in_layer`` for ``txt_in.c_embedder.linear_1``…) and
maps LoRA keys to its weights from those spellings; every other name it maps from Tencent's
(``comfy/lora.py``). :data:`HUNYUAN_COMFY` is that spelling.
"""

from __future__ import annotations

from dataclasses import replace

from . import Rule, RuleScheme

_D, _T = "double_blocks.{i}.", "transformer_blocks.{i}."
_S, _ST = "single_blocks.{i}.", "single_transformer_blocks.{i}."
_R, _RT = "txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}."
_TS, _CT = "time_text_embed.", "context_embedder.time_text_embed."


def _qkv(original: str, members: tuple[str, ...], diffusers: str) -> Rule:
    return Rule(original, tuple(diffusers + m for m in members))


def _blocks() -> list[Rule]:
    return [
        _qkv(_D + "img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), _T),
        Rule(_D + "img_attn_proj", (_T + "attn.to_out.0",)),
        Rule(_D + "img_mlp.fc1", (_T + "ff.net.0.proj",)),
        Rule(_D + "img_mlp.fc2", (_T + "ff.net.2",)),
        Rule(_D + "img_mod.linear", (_T + "norm1.linear",)),
        _qkv(_D + "txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _T),
        Rule(_D + "txt_attn_proj", (_T + "attn.to_add_out",)),
        Rule(_D + "txt_mlp.fc1", (_T + "ff_context.net.0.proj",)),
        Rule(_D + "txt_mlp.fc2", (_T + "ff_context.net.2",)),
        Rule(_D + "txt_mod.linear", (_T + "norm1_context.linear",)),
        Rule(_S + "linear1", tuple(_ST + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), (1, 1, 1, 4)),
        Rule(_S + "linear2", (_ST + "proj_out",)),
        Rule(_S + "modulation.linear", (_ST + "norm.linear",)),
        _qkv(_R + "self_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), _RT),
        Rule(_R + "self_attn_proj", (_RT + "attn.to_out.0",)),
        Rule(_R + "mlp.fc1", (_RT + "ff.net.0.proj",)),
        Rule(_R + "mlp.fc2", (_RT + "ff.net.2",)),
        Rule(_R + "adaLN_modulation.1", (_RT + "norm_out.linear",)),
        Rule("img_in.proj", ("x_embedder.proj",)),
        Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
        Rule("vector_in.in_layer", (_TS + "text_embedder.linear_1",)),
        Rule("vector_in.out_layer", (_TS + "text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]


def _embedders(first: str, second: str, c_first: str, c_second: str) -> list[Rule]:
    """The MLP embedders, whose spelling differs between Tencent and ComfyUI."""
    return [
        Rule(f"time_in.{first}", (_TS + "timestep_embedder.linear_1",)),
        Rule(f"time_in.{second}", (_TS + "timestep_embedder.linear_2",)),
        Rule(f"guidance_in.{first}", (_TS + "guidance_embedder.linear_1",)),
        Rule(f"guidance_in.{second}", (_TS + "guidance_embedder.linear_2",)),
        Rule(f"txt_in.t_embedder.{first}", (_CT + "timestep_embedder.linear_1",)),
        Rule(f"txt_in.t_embedder.{second}", (_CT + "timestep_embedder.linear_2",)),
        Rule(f"txt_in.c_embedder.{c_first}", (_CT + "text_embedder.linear_1",)),
        Rule(f"txt_in.c_embedder.{c_second}", (_CT + "text_embedder.linear_2",)),
    ]


HUNYUAN = RuleScheme("hunyuan", _blocks() + _embedders("mlp.0", "mlp.2", "linear_1", "linear_2"))
HUNYUAN_COMFY = RuleScheme("hunyuan-comfyui", _blocks() + _embedders("in_layer", "out_layer", "in_layer", "out_layer"))

# ComfyUI's HunyuanVideo model is built from Flux's layers (comfy/ldm/hunyuan_video/model.py):
# ``img_attn.qkv``, ``img_mlp.0``, ``img_mod.lin``, ``modulation.lin``, the refiner's
# ``self_attn.qkv``/``mlp.0``. Its generic LoRA candidates (``lora_unet_``/``diffusion_model.``
# + its own names) use these; its HunyuanVideo branch renames them into HUNYUAN_COMFY
# (``_mod.lin.`` → ``_mod.linear.``, ``_attn.qkv.`` → ``_attn_qkv.``, ``mlp.0.`` → ``mlp.fc1.``…;
# docs/notes/clients.md §1.2). This is that rename undone.
_COMFY_MODEL_RENAMES = ((".img_mod.linear.", ".img_mod.lin."), (".txt_mod.linear.", ".txt_mod.lin."),
                        ("_attn_qkv.", "_attn.qkv."), ("_attn_proj.", "_attn.proj."), ("mlp.fc1.", "mlp.0."),
                        ("mlp.fc2.", "mlp.2."), (".modulation.linear.", ".modulation.lin."))


def _comfy_model(rule: Rule) -> Rule:
    name = rule.scheme + "."
    for tencent, comfy in _COMFY_MODEL_RENAMES:
        name = name.replace(tencent, comfy)
    return replace(rule, scheme=name[:-1])


HUNYUAN_COMFY_MODEL = RuleScheme("hunyuan-comfyui-model", [_comfy_model(r) for r in HUNYUAN_COMFY.rules])
