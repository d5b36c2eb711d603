"""Tiny video transformers and pipelines (Wan, HunyuanVideo, LTX-2, LTX-Video) built from
configs, original-name (single-file) state dicts of them, and LoRA files written by hand in
the formats the trainers write — for tests that check loramerge against diffusers itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from loramerge.formats import keymaps
from loramerge.formats.schemes import Scheme, Target


def wan_transformer(image: bool = False, layers: int = 2, seed: int = 0):
    """Wan with 2 heads of 16 (width 32); ``image``: Wan 2.1 I2V's image cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=8 if image else 4, out_channels=4, text_dim=24, freq_dim=16,
                                 ffn_dim=48, num_layers=layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", image_dim=20 if image else None,
                                 added_kv_proj_dim=32 if image else None, rope_max_seq_len=32)


def hunyuan_transformer():
    """Patches 1×2×2 as the real model has (PEFT cannot fuse a 1×1×1 Conv3d LoRA: it takes it
    for a 1×1 Conv2d)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                          num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0,
                                          patch_size=2, patch_size_t=1, text_embed_dim=24, pooled_projection_dim=16,
                                          rope_axes_dim=(4, 6, 6))


def ltx2_transformer():
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                       cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
                                       audio_num_attention_heads=2, audio_attention_head_dim=8,
                                       audio_cross_attention_dim=16, num_layers=2, caption_channels=24)


def ltx2_connectors():
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    return LTX2TextConnectors(caption_channels=8, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                              video_connector_attention_head_dim=16, video_connector_num_layers=1,
                              video_connector_num_learnable_registers=4, audio_connector_num_attention_heads=2,
                              audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                              audio_connector_num_learnable_registers=4, video_hidden_dim=32, audio_hidden_dim=16)


def ltx_video_transformer():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                      cross_attention_dim=32, num_layers=2, caption_channels=24)


def pipeline(arch: str, transformer=None, transformer_2=None, connectors=None):
    """The real diffusers pipeline class of ``arch`` holding tiny denoisers (no text encoder,
    tokenizer or VAE: LoRA loading and fusing never touch them)."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if arch == "wan":
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                     transformer=transformer, transformer_2=transformer_2)
    if arch == "hunyuanvideo":
        return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                              scheduler=scheduler, text_encoder_2=None, tokenizer_2=None)
    if arch == "ltx2":
        return diffusers.LTX2Pipeline(scheduler=scheduler, vae=None, audio_vae=None, text_encoder=None,
                                      tokenizer=None, connectors=connectors, transformer=transformer, vocoder=None)
    return diffusers.LTXPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=transformer)


def linears(model, pattern=None) -> dict[str, torch.nn.Module]:
    """{name: module} of every Linear/Conv of a model (optionally filtered by a regex)."""
    import re

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
            and (pattern is None or re.search(pattern, n))}


def shapes_of(model, pattern=None) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in linears(model, pattern).items()}


def table(variant: str, component: str = "transformer", pattern=None) -> dict[str, tuple[int, ...]]:
    """A full-size model's modules and shapes (loramerge's key table, checked against the
    models built on meta in test_arch_video)."""
    import re

    return {n: s for n, s in keymaps.table(variant)[component].items()
            if len(s) > 1 and (pattern is None or re.search(pattern, n))}  # matrices: the tables list norm weights too


@dataclass
class FileModule:
    """One module as a file holds it: its name in the file's scheme, factors, alpha."""

    target: Target
    up: torch.Tensor  # rows in the scheme's order (fused members stacked, halves as the scheme has them)
    down: torch.Tensor
    alpha: float | None


def file_modules(shapes: dict[str, tuple[int, ...]], scheme: Scheme, rank, alpha, seed: int,
                 scale: float = 0.5) -> dict[str, FileModule]:
    """Random factors for every module the scheme names for these canonical modules (a fused
    target gets one down and one up over all its members' rows). ``rank``/``alpha`` may be
    callables of the file name (per-module ranks and alphas)."""
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, int] = {}
    targets: dict[str, Target] = {}
    inner: dict[str, tuple[int, ...]] = {}
    for name, shape in sorted(shapes.items()):
        target, _ = scheme.encode(name)
        targets[target.name] = target
        rows[target.name] = rows.get(target.name, 0) + shape[0]
        inner[target.name] = tuple(shape[1:])
    out = {}
    for tname in sorted(targets):
        n_in = math.prod(inner[tname])
        r = min(rank(tname) if callable(rank) else rank, rows[tname], n_in)
        down = torch.randn(r, *inner[tname], generator=gen) / n_in ** 0.5
        up = torch.randn(rows[tname], r, *([1] * len(inner[tname][1:])), generator=gen) * scale / r ** 0.5
        out[tname] = FileModule(targets[tname], up, down, alpha(tname) if callable(alpha) else alpha)
    return out


def member_factors(modules: dict[str, FileModule], shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{canonical name: (U, D)} in float64 with ΔW = U @ D exactly (alpha/r folded into U, rows
    split among fused members, swapped halves put back in canonical order)."""
    out = {}
    for fm in modules.values():
        r = fm.down.shape[0]
        scale = (fm.alpha if fm.alpha else r) / r
        up = scale * fm.up.double().reshape(fm.up.shape[0], r)
        if fm.target.swap_halves is True:
            a, b = up.chunk(2)
            up = torch.cat([b, a])
        down = fm.down.double().reshape(r, -1)
        start = 0
        for member in fm.target.members:
            size = shapes[member][0]
            out[member] = (up[start:start + size], down)
            start += size
    return out


def deltas(modules: dict[str, FileModule], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{canonical name: dense ΔW in float64, in the weight's shape}."""
    return {n: (u @ d).reshape(shapes[n]) for n, (u, d) in member_factors(modules, shapes).items()}


def write(path, modules: dict[str, FileModule], prefix: str, style: str = "peft", flat: bool = False,
          dtype=torch.float32, metadata=None, infix: str = "") -> dict[str, FileModule]:
    """A LoRA file as a trainer writes it: ``style`` peft (lora_A/B, the scale folded into the
    up factor, as ai-toolkit / diffusion-pipe write) or kohya (lora_down/up + .alpha); kohya
    ``flat`` names; ``infix`` between the module and the factor suffix (DiffSynth's
    ``.default``). Returns the modules exactly as stored (after the cast), the reference."""
    sd, stored = {}, {}
    for tname, fm in sorted(modules.items()):
        key = prefix + (tname.replace(".", "_") if flat else tname)
        if style == "kohya":
            down, up, alpha = fm.down.to(dtype), fm.up.to(dtype), fm.alpha
            sd[f"{key}.lora_down{infix}.weight"], sd[f"{key}.lora_up{infix}.weight"] = down, up
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            scale = (fm.alpha / fm.down.shape[0]) if fm.alpha else 1.0
            down, up, alpha = fm.down.to(dtype), (fm.up * scale).to(dtype), None
            sd[f"{key}.lora_A{infix}.weight"], sd[f"{key}.lora_B{infix}.weight"] = down, up
        stored[tname] = FileModule(fm.target, up.float(), down.float(), alpha)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return stored


def original_state(model, scheme: Scheme, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every Linear/Conv weight and bias of a diffusers model under its original name (fused
    tensors stacked, swapped halves swapped): the layout of a ComfyUI / official single file.
    Tests check it against diffusers' own single-file converters before using it."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, module in linears(model).items():
        target, position = scheme.encode(name)
        for param in ("weight", "bias"):
            tensor = getattr(module, param, None)
            if tensor is None:
                continue
            tensor = tensor.detach().clone()
            if target.fused:
                fused.setdefault(f"{target.name}.{param}", {})[position] = tensor
                continue
            if target.swap_halves is True:
                a, b = tensor.chunk(2)
                tensor = torch.cat([b, a])
            out[f"{prefix}{target.name}.{param}"] = tensor
    for key, parts in fused.items():
        out[prefix + key] = torch.cat([parts[p] for p in sorted(parts)])
    return out


def combine(path, *parts) -> None:
    """One safetensors file holding the tensors of several (the parts are removed)."""
    from safetensors import safe_open

    tensors, metadata = {}, {}
    for part in parts:
        with safe_open(str(part), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
            metadata.update(f.metadata() or {})
        part.unlink()
    save_file(tensors, str(path), metadata=metadata or None)


def weight_of(model, name: str) -> torch.nn.Module:
    """The Linear/Conv a name refers to, below any PEFT wrapper."""
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)
