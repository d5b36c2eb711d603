"""Tiny diffusers pipelines built from configs, and LoRA files written by hand (not by loramerge),
for tests that check loramerge against diffusers itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings

import torch
from safetensors.torch import save_file

from loramerge.formats.schemes.sgm import diffusers_to_sgm


def _clip(hidden=32, projection=False, act="quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act=act)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=16,
    )


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=64, attention_head_dim=(2, 4, 8),
        norm_num_groups=8, sample_size=16, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    )


def sd2_unet():
    """SD2's UNet shape: linear projections, per-block head dims, a cross-attention width of its own."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24, attention_head_dim=(2, 4, 4, 4), norm_num_groups=8, sample_size=16,
        use_linear_projection=True,
    )


def sd2_pipeline():
    """Tiny SD2: its UNet and an OpenCLIP-H-style text encoder (CLIPTextModel, gelu, width 24)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(hidden=24, act="gelu"), tokenizer=None,
                                   unet=sd2_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd3_pipeline():
    """Tiny SD3: an MMDiT of two joint blocks (the last one context-pre-only), CLIP-L/G, T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=64, out_channels=4)
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
                                 feed_forward_proj="gated-gelu"))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                                    text_encoder=_clip(projection=True), tokenizer=None,
                                    text_encoder_2=_clip(projection=True), tokenizer_2=None,
                                    text_encoder_3=t5, tokenizer_3=None)


def sd15_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(), tokenizer=None, unet=sd15_unet(),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(), text_encoder_2=_clip(projection=True),
                                     tokenizer=None, tokenizer_2=None, unet=sdxl_unet(),
                                     scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))


def flux_pipeline(wide: bool = False):
    """Tiny Flux; ``wide`` builds one single block at Flux.1's real width (3072, MLP 12288),
    because diffusers hard-codes those split sizes for kohya ``single_blocks_*_linear1``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    if wide:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=0, num_single_layers=1,
                                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(16, 56, 56))
    else:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
                                 feed_forward_proj="gated-gelu"))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=_clip(),
                        tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=transformer)


# --------------------------------------------------------------------------------------------

_TARGET = re.compile(
    r"(to_(q|k|v)|to_out\.0|ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out)|(q|k|v|out)_proj|fc(1|2)"
    r"|add_(q|k|v)_proj|to_add_out|ff_context\.net\.(0\.proj|2)|proj_mlp|single_transformer_blocks\.\d+\.proj_out"
    r"|resnets\.\d+\.(conv1|conv2|time_emb_proj)|norm1\.linear|norm\.linear|norm_out\.linear|x_embedder)$"
)


def canonical(component: str, name: str) -> str:
    if component.startswith("text_encoder") and name.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        return "text_model." + name  # transformers ≥ 5 flattens CLIPTextModel (T5's encoder.block… stays)
    return name


def targets(pipe, components, pattern=_TARGET) -> dict[tuple[str, str], torch.nn.Module]:
    """{(component, canonical module name): module} of the LoRA-able layers of a pipeline."""
    found = {}
    for component in components:
        model = getattr(pipe, component)
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.search(name):
                found[(component, canonical(component, name))] = module
    return found


def weight_of(pipe, component: str, name: str) -> torch.Tensor:
    model = getattr(pipe, component)
    modules = dict(model.named_modules())
    module = modules.get(name) or modules[name.removeprefix("text_model.")]
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def random_factors(mods: dict, rank: int, alpha: float | None, seed: int, scale=0.5):
    """{(component, name): (up, down, alpha)} in the layer's storage layout (conv: 4-D)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for key, module in sorted(mods.items()):
        w = module.weight
        r = min(rank, w.shape[0], w[0].numel())
        if w.dim() == 4:
            down = torch.randn(r, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
            up = torch.randn(w.shape[0], r, 1, 1, generator=gen) * scale / r**0.5
        else:
            down = torch.randn(r, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], r, generator=gen) * scale / r**0.5
        factors[key] = (up, down, alpha)
    return factors


def delta_of(up, down, alpha, shape) -> torch.Tensor:
    """ΔW = alpha/r · up @ down, computed directly (float32)."""
    r = down.shape[0]
    scale = (alpha if alpha else r) / r
    return (scale * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))).reshape(shape)


# kohya-format writing by hand: prefixes and names as kohya sd-scripts writes them.
_KOHYA_TE = {"sd1": {"text_encoder": "lora_te_"}, "sd2": {"text_encoder": "lora_te_"},
             "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
             "flux": {"text_encoder": "lora_te1_"}}


# What kohya sd-scripts writes as ss_base_model_version (SD1 and SD2 modules outside
# cross-attention share names and shapes, so tiny models need it to be told apart).
KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}


def kohya_key(arch: str, component: str, name: str) -> str:
    if component in ("unet", "transformer"):
        if arch == "sdxl":
            name = diffusers_to_sgm(name, (0, 1))
        return "lora_unet_" + name.replace(".", "_")
    return _KOHYA_TE[arch][component] + name.replace(".", "_")


def write_kohya(path, arch: str, factors: dict, dtype=torch.float32) -> None:
    sd = {}
    for (component, name), (up, down, alpha) in factors.items():
        key = kohya_key(arch, component, name)
        sd[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        sd[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": KOHYA_VERSION[arch]})


def write_flux_kohya(path, factors: dict, fused: dict) -> None:
    """kohya Flux: ``fused`` maps a BFL name to its diffusers members (shared down, stacked up)."""
    sd = {}
    for bfl, members in fused.items():
        ups = [factors[("transformer", m)][0] for m in members]
        down = factors[("transformer", members[0])][1]
        alpha = factors[("transformer", members[0])][2]
        key = "lora_unet_" + bfl.replace(".", "_")
        up = torch.cat(ups, 0)
        if bfl == "final_layer.adaLN_modulation.1":  # BFL emits (shift, scale), diffusers (scale, shift)
            scale, shift = up.chunk(2, 0)
            up = torch.cat([shift, scale], 0)
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    for (component, name), (up, down, alpha) in factors.items():
        if component == "text_encoder":
            key = "lora_te1_" + name.replace(".", "_")
            sd[f"{key}.lora_up.weight"] = up.contiguous()
            sd[f"{key}.lora_down.weight"] = down.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_base_model_version": KOHYA_VERSION["flux"]})


def write_diffusers(path, factors: dict, header: dict | None = None) -> None:
    """diffusers/PEFT keys, with alphas in ``lora_adapter_metadata`` as diffusers writes them
    (``header``: further metadata fields)."""
    sd, meta = {}, {}
    by_component: dict[str, list] = {}
    for (component, name), (up, down, alpha) in factors.items():
        sd[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        sd[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        by_component.setdefault(component, []).append((name, down.shape[0], alpha or down.shape[0]))
    for component, rows in by_component.items():
        r = rows[0][1]
        # PEFT matches targets as dotted suffixes; without "text_model." they match CLIP in
        # every transformers version (≥ 5 drops that level)
        short = lambda n: n.removeprefix("text_model.")  # noqa: E731
        meta.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": rows[0][2],
            f"{component}.rank_pattern": {short(n): rk for n, rk, _ in rows if rk != r},
            f"{component}.alpha_pattern": {short(n): a for n, _, a in rows if a != rows[0][2]},
            f"{component}.target_modules": sorted(short(n) for n, _, _ in rows),
        })
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta), **(header or {})})


@contextlib.contextmanager
def capture_load_warnings():
    """Collect warnings diffusers/PEFT/transformers emit (their loggers do not propagate)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    records.extend(str(w.message) for w in caught)


def lora_layers(model, adapter: str) -> list[str]:
    """Names of the modules PEFT injected ``adapter`` into."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})]


def injected(pipe, components, adapter: str) -> dict[str, tuple[float, torch.Tensor, torch.Tensor | None]]:
    """What diffusers injected: {component.canonical name: (PEFT's scaling, ΔW as PEFT computes it
    for fusing, Δbias or None)} of every layer that holds ``adapter``."""
    out = {}
    for component in components:
        for name, module in getattr(pipe, component).named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                delta = module.get_delta_weight(adapter).detach().double()
                bias = module.lora_B[adapter].bias
                out[f"{component}.{canonical(component, name)}"] = (
                    float(module.scaling[adapter]), delta,
                    None if bias is None else (bias * module.scaling[adapter]).detach().double())
    return out


# --------------------------------------------------------------------------------------------
# single-file checkpoints in LDM/sgm naming, built from a tiny pipeline (the tests check them
# against diffusers' own LDM converters before trusting them)

_OPENCLIP_RENAMES = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def _hf_clip_state(model) -> dict:
    return {canonical("text_encoder", k): v.detach().clone() for k, v in model.state_dict().items()}


def _open_clip_state(model, prefix: str) -> dict:
    sd = _hf_clip_state(model)
    out = {}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        base = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{base}self_attn.{x}_proj.{kind}") for x in "qkv"])
        for k in [k for k in sd if k.startswith(base)]:
            rest = k[len(base):]
            for old, new in _OPENCLIP_RENAMES:
                rest = rest.replace(old, new)
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = sd.pop(k)
    out[prefix + "token_embedding.weight"] = sd.pop("text_model.embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = sd.pop("text_model.embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = sd.pop("text_model.final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = sd.pop("text_model.final_layer_norm.bias")
    out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    sd.pop("text_model.embeddings.position_ids", None)
    assert not sd, sorted(sd)
    return out


def single_file_state(pipe, arch: str) -> dict:
    """The UNet and text encoders of a tiny SD1/SDXL pipeline as an LDM/sgm single file."""
    layout = (0, 1) if arch == "sdxl" else (1, 2, 3)
    out = {}
    for key, value in pipe.unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        out["model.diffusion_model." + diffusers_to_sgm(module, layout) + "." + param] = value.detach().clone()
    if arch == "sd1":
        out.update({"cond_stage_model.transformer." + k: v for k, v in _hf_clip_state(pipe.text_encoder).items()})
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in _hf_clip_state(pipe.text_encoder).items()})
        out.update(_open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


def from_single_file_state(sd: dict, pipe, arch: str) -> dict:
    """Read a single-file state back with diffusers' own converters: {(component, name): tensor}."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_open_clip_checkpoint,
    )

    out = {}
    unet = convert_ldm_unet_checkpoint(dict(sd), dict(pipe.unet.config))
    out.update({("unet", k): v for k, v in unet.items()})
    if arch == "sd1":
        te = convert_ldm_clip_checkpoint(dict(sd), remove_prefix="cond_stage_model.transformer.")
        out.update({("text_encoder", k): v for k, v in te.items()})
    else:
        te = convert_ldm_clip_checkpoint(dict(sd), remove_prefix="conditioner.embedders.0.transformer.")
        out.update({("text_encoder", k): v for k, v in te.items()})
        te2 = convert_open_clip_checkpoint(pipe.text_encoder_2, dict(sd), prefix="conditioner.embedders.1.model.")
        out.update({("text_encoder_2", k): v for k, v in te2.items()})
    return out
