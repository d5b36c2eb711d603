"""Qwen-Image, Z-Image and Lumina 2 for tests: tiny transformers and pipelines built from
configs, full-size module sets enumerated on the meta device, the original (ComfyUI / NextDiT)
names written out by hand, and LoRA files in each trainer's layout written here (not by
loramerge), with the float64 ΔW each file means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

ARCHS = ("qwen_image", "zimage", "lumina2")
PIPELINES = {"qwen_image": "QwenImagePipeline", "zimage": "ZImagePipeline", "lumina2": "Lumina2Pipeline"}
FULL_SIZE = {"qwen_image": "qwen-image", "zimage": "z-image-turbo", "lumina2": "lumina2"}


def qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))


def zimage_transformer(omni: bool = False):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
                                    axes_lens=[64, 32, 32], siglip_feat_dim=24 if omni else None)


def lumina_transformer(wide: bool = False):
    """Tiny Lumina 2 with its 3:1 query:kv heads; ``wide`` = the real attention width (2304,
    24 heads, 8 kv heads: diffusers hard-codes the 2304/768/768 qkv split) with a tiny MLP."""
    from diffusers import Lumina2Transformer2DModel

    if wide:
        return Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=2304, num_layers=1,
                                         num_refiner_layers=0, num_attention_heads=24, num_kv_heads=8, multiple_of=16,
                                         ffn_dim_multiplier=0.01, cap_feat_dim=16, axes_dim_rope=(32, 32, 32),
                                         axes_lens=(32, 32, 32))
    return Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=48, num_layers=2,
                                     num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
                                     cap_feat_dim=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32))


TRANSFORMERS = {"qwen_image": qwen_transformer, "zimage": zimage_transformer, "lumina2": lumina_transformer}


def transformer(arch: str, **kw):
    torch.manual_seed(0)
    return TRANSFORMERS[arch](**kw)


def pipeline(arch: str, model=None):
    """The real diffusers pipeline class around a tiny transformer (no VAE or text encoder:
    LoRAs touch only the transformer)."""
    import diffusers

    cls = getattr(diffusers, PIPELINES[arch])
    return cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               transformer=model if model is not None else transformer(arch))


def linears(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def meta_modules(variant: str) -> dict[str, tuple[int, ...]]:
    """Every Linear of the full-size transformer, built from its config on the meta device."""
    from loramerge.formats import keymaps

    return linears(keymaps.build_model(keymaps.configs()[variant]["transformer"], "meta"))


# --------------------------------------------------------------------------------------------
# original names, written out here (the tests check them against diffusers' single-file converters)

_BLOCK = r"((?:layers|noise_refiner|context_refiner|siglip_refiner)\.\d+)\."


def zimage_original(name: str) -> tuple[str, int]:
    """diffusers Z-Image name → (ComfyUI/original name, position in a fused q/k/v)."""
    if m := re.fullmatch(_BLOCK + r"attention\.to_([qkv])", name):
        return f"{m[1]}.attention.qkv", "qkv".index(m[2])
    if m := re.fullmatch(_BLOCK + r"attention\.to_out\.0", name):
        return f"{m[1]}.attention.out", 0
    if name.startswith("all_x_embedder.2-1"):
        return "x_embedder" + name[len("all_x_embedder.2-1"):], 0
    if name.startswith("all_final_layer.2-1."):
        return "final_layer." + name[len("all_final_layer.2-1."):], 0
    return name, 0


_LUMINA_TOP = {
    "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_caption_embed.caption_embedder.1": "cap_embedder.1",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",
    "norm_out.linear_2": "final_layer.linear",
    "x_embedder": "x_embedder",
}


def lumina_original(name: str) -> tuple[str, int]:
    if name in _LUMINA_TOP:
        return _LUMINA_TOP[name], 0
    m = re.fullmatch(_BLOCK + r"(.+)", name)
    block, rest = m[1], m[2]
    if rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
        return f"{block}.attention.qkv", "qkv".index(rest[-1])
    renamed = {"attn.to_out.0": "attention.out", "norm1.linear": "adaLN_modulation.1",
               **{f"feed_forward.linear_{i}": f"feed_forward.w{i}" for i in (1, 2, 3)}}[rest]
    return f"{block}.{renamed}", 0


ORIGINAL = {"qwen_image": lambda n: (n, 0), "zimage": zimage_original, "lumina2": lumina_original}


# --------------------------------------------------------------------------------------------
# files as trainers lay them out


@dataclass(frozen=True)
class Layout:
    prefix: str
    original: bool  # original (ComfyUI) names, fused q/k/v; else diffusers names
    style: str  # kohya (lora_down/lora_up), peft (lora_A/lora_B), peft_default (lora_A.default), dotted (lora.down, to.q)
    alpha: bool  # writes .alpha keys
    flat: bool = False  # kohya's '.' → '_'


LAYOUTS = {
    "qwen_image": {
        "musubi": Layout("lora_unet_", False, "kohya", True, flat=True),
        "ai-toolkit": Layout("diffusion_model.", False, "peft", False),
        "onetrainer-comfy": Layout("diffusion_model.", False, "peft", True),
        "onetrainer-original": Layout("", False, "peft", True),
        "diffsynth": Layout("", False, "peft_default", False),
        "diffusers": Layout("transformer.", False, "peft", False),
        "onetrainer-legacy": Layout("transformer.", False, "kohya", True),
    },
    "zimage": {
        "ai-toolkit": Layout("diffusion_model.", False, "peft", False),
        "musubi": Layout("lora_unet_", False, "kohya", True, flat=True),
        "musubi-comfy": Layout("lora_unet_", True, "kohya", True, flat=True),
        "diffusion-pipe": Layout("diffusion_model.", True, "peft", False),
        "diffsynth": Layout("", False, "peft_default", False),
        "diffusers": Layout("transformer.", False, "peft", False),
        "onetrainer-comfy": Layout("diffusion_model.", False, "peft", True),
        "onetrainer-legacy": Layout("transformer.", False, "kohya", True),
        "anime-z": Layout("diffusion_model.", False, "dotted", False),  # as diffusers' converter describes it
    },
    "lumina2": {
        "diffusion-pipe": Layout("diffusion_model.", True, "peft", False),
        "sd-scripts": Layout("lora_unet_", True, "kohya", True, flat=True),
        "ai-toolkit": Layout("transformer.", False, "peft", False),
    },
}


@dataclass
class FileModule:
    """One module as a file names it, and the canonical modules its output rows hold."""

    name: str
    rows: int
    cols: int
    members: list[tuple[str, int, int]]  # (canonical name, first row, end row)


def file_modules(arch: str, modules: dict[str, tuple[int, ...]], original: bool) -> dict[str, FileModule]:
    """Canonical modules grouped into the modules a file in that naming holds (q, k, v fused)."""
    groups: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    for name, shape in modules.items():
        file_name, position = ORIGINAL[arch](name) if original else (name, 0)
        groups.setdefault(file_name, []).append((position, name, shape))
    out = {}
    for file_name, parts in sorted(groups.items()):
        members, row = [], 0
        for _, name, shape in sorted(parts):
            members.append((name, row, row + shape[0]))
            row += shape[0]
        out[file_name] = FileModule(file_name, row, parts[0][2][1], members)
    return out


def random_factors(mods: dict[str, FileModule], seed: int, ranks=(4, 2, 3, 1), alphas=(8.0, 1.0, 3.0, 0.5),
                   dtype=torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{file module: (up, down, alpha)}: ranks and alphas cycling per module (alphas None: the
    file has no alpha, scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, fm) in enumerate(sorted(mods.items())):
        r = min(ranks[i % len(ranks)], fm.rows, fm.cols)
        down = torch.randn(r, fm.cols, generator=gen) / math.sqrt(fm.cols)
        up = torch.randn(fm.rows, r, generator=gen) * 0.3 / math.sqrt(r)
        alpha = None if alphas is None else alphas[i % len(alphas)]
        out[name] = (up.to(dtype), down.to(dtype), alpha)
    return out


_SUFFIX = {"kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
           "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"),
           "dotted": (".lora.up.weight", ".lora.down.weight")}


def key_of(layout: Layout, name: str) -> str:
    if layout.style == "dotted":
        name = re.sub(r"\.to_([qkv])$", r".to.\1", name)
    return layout.prefix + (name.replace(".", "_") if layout.flat else name)


def write(path, layout: Layout, factors: dict, metadata: dict | None = None) -> None:
    sd = {}
    for name, (up, down, alpha) in factors.items():
        key = key_of(layout, name)
        up_suffix, down_suffix = _SUFFIX[layout.style]
        sd[key + up_suffix] = up.contiguous()
        sd[key + down_suffix] = down.contiguous()
        if layout.alpha and alpha is not None:
            sd[key + ".alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata=metadata)


class Deltas(dict):
    """{canonical module: (up rows, down, scale)} of a file, read as ΔW = scale·up@down in
    float64 from the file's own tensors — densely (``[name]``) or on probe vectors (``apply``)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        up, down, scale = super().__getitem__(name)
        return scale * up.double() @ down.double()

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        up, down, scale = super().__getitem__(name)
        return scale * (up.double() @ (down.double() @ x.double()))

    def items(self):
        return ((k, self[k]) for k in self)

    def values(self):
        return (self[k] for k in self)


def deltas(mods: dict[str, FileModule], factors: dict) -> Deltas:
    out = Deltas()
    for name, (up, down, alpha) in factors.items():
        r = down.shape[0]
        scale = (alpha if alpha is not None else r) / r
        for member, start, end in mods[name].members:
            dict.__setitem__(out, member, (up[start:end], down, scale))
    return out


def make_file(path, arch: str, layout_name: str, modules: dict[str, tuple[int, ...]], seed: int,
              dtype=torch.float32, metadata=None, **factor_kw) -> Deltas:
    """Write one LoRA in a trainer's layout; returns its ΔW per canonical module."""
    layout = LAYOUTS[arch][layout_name]
    mods = file_modules(arch, modules, layout.original)
    if not layout.alpha:  # no .alpha keys: scale 1
        factor_kw["alphas"] = None
    factors = random_factors(mods, seed, dtype=dtype, **factor_kw)
    write(path, layout, factors, metadata)
    return deltas(mods, factors)


def write_lokr(path, prefix: str, flat: bool, modules: dict[str, tuple[int, ...]], seed: int, alpha=4.0):
    """LyCORIS LoKr: ΔW = alpha/r · kron(w1, w2_a @ w2_b) with w1 full (2×2) and w2 of rank r."""
    gen = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for i, (name, (rows, cols)) in enumerate(sorted(modules.items())):
        r = 1 + i % 2
        w1 = torch.randn(2, 2, generator=gen)
        w2_a = torch.randn(rows // 2, r, generator=gen) * 0.1
        w2_b = torch.randn(r, cols // 2, generator=gen) * 0.1
        key = prefix + (name.replace(".", "_") if flat else name)
        sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b,
                   f"{key}.alpha": torch.tensor(alpha)})
        expected[name] = lambda w1=w1, w2_a=w2_a, w2_b=w2_b, s=alpha / r: s * torch.kron(
            w1.double(), w2_a.double() @ w2_b.double())
    save_file(sd, str(path))
    return expected  # {name: () → dense ΔW in float64}


# --------------------------------------------------------------------------------------------
# ComfyUI-style single files of a tiny transformer


def comfy_single_file(arch: str, model, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """The transformer's state dict with its Linears in original names, q/k/v fused, as
    ComfyUI stores them (other tensors keep their names: nothing here reads them; norm weights,
    whose diffusers names would look like another architecture's to the base-model detection,
    are left out)."""
    linear = linears(model)
    fused: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module not in linear and "norm" in module:
            continue
        name, position = ORIGINAL[arch](module) if module in linear else (module, 0)
        if name.endswith(".attention.qkv"):
            fused.setdefault(f"{name}.{param}", {})[position] = value
        else:
            out[f"{prefix}{name}.{param}"] = value.detach().clone()
    for key, parts in fused.items():
        out[prefix + key] = torch.cat([parts[i] for i in sorted(parts)]).detach().clone()
    return out
