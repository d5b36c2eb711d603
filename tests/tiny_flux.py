"""Tiny Flux.2, Chroma, Flux.1, SD3 and HiDream pipelines, and LoRA files in their tools' formats,
written here by hand from canonical (diffusers-named) factors — not by loramerge — so tests can
check loramerge against diffusers.

The original-name tables below restate docs/notes/archs_flux_family.md independently of
loramerge's schemes: (diffusers module regex, original name template, position in the fused
original module). Tests check them against diffusers' own single-file converters.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

import tiny

# --------------------------------------------------------------------------------------------
# tiny models and pipelines (text encoders, VAEs and tokenizers left out: LoRAs touch only the
# transformer, and diffusers' LoRA loaders need nothing else)

def flux2_transformer(guidance: bool = False):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=16, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance)


def chroma_transformer():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                    approximator_hidden_dim=40, approximator_layers=2)


def sd3_transformer():
    """SD3.5-medium-like: MMDiT-X attn2 in block 0, qk-norm, 3 blocks (the last context_pre_only)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=24, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def hidream_transformer():
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                          caption_channels=[32, 32], text_emb_dim=24, num_routed_experts=2,
                                          num_activated_experts=1, axes_dims_rope=(8, 4, 4),
                                          max_resolution=(16, 16), llama_layers=[0, 1, 1, 1])


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def pipeline(arch: str, guidance: bool = False):
    """A real diffusers pipeline of ``arch`` holding a tiny transformer (other parts None)."""
    import diffusers

    torch.manual_seed(0)
    if arch == "flux2":
        cls = diffusers.Flux2Pipeline if guidance else diffusers.Flux2KleinPipeline
        return cls(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                   transformer=flux2_transformer(guidance))
    if arch == "chroma":
        return diffusers.ChromaPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                        transformer=chroma_transformer())
    if arch == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=sd3_transformer())
    if arch == "hidream":
        none = dict.fromkeys([f"{k}{s}" for k in ("text_encoder", "tokenizer") for s in ("", "_2", "_3", "_4")])
        return diffusers.HiDreamImagePipeline(scheduler=_scheduler(), vae=None, transformer=hidream_transformer(),
                                              **none)
    if arch == "flux":
        return tiny.flux_pipeline()
    raise KeyError(arch)


def modules(pipe) -> dict[tuple[str, str], torch.nn.Module]:
    """Every Linear/Conv2d of the transformer: {("transformer", name): module}."""
    return {("transformer", n): m for n, m in pipe.transformer.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


# --------------------------------------------------------------------------------------------
# original names (BFL, MMDiT) of diffusers modules

_I = r"(\d+)"
_T, _S = rf"transformer_blocks\.{_I}\.", rf"single_transformer_blocks\.{_I}\."
_BLOCK_QKV = [
    (_T + r"attn\.to_q", r"double_blocks.\1.img_attn.qkv", 0), (_T + r"attn\.to_k", r"double_blocks.\1.img_attn.qkv", 1),
    (_T + r"attn\.to_v", r"double_blocks.\1.img_attn.qkv", 2),
    (_T + r"attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv", 0),
    (_T + r"attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv", 1),
    (_T + r"attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv", 2),
    (_T + r"attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", 0),
    (_T + r"attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", 0),
]
FLUX2_NAMES = _BLOCK_QKV + [
    (_T + r"ff\.linear_in", r"double_blocks.\1.img_mlp.0", 0), (_T + r"ff\.linear_out", r"double_blocks.\1.img_mlp.2", 0),
    (_T + r"ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0", 0),
    (_T + r"ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2", 0),
    (_S + r"attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1", 0), (_S + r"attn\.to_out", r"single_blocks.\1.linear2", 0),
    (r"x_embedder", "img_in", 0), (r"context_embedder", "txt_in", 0),
    (r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0),
    (r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0),
    (r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0),
    (r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0),
    (r"double_stream_modulation_img\.linear", "double_stream_modulation_img.lin", 0),
    (r"double_stream_modulation_txt\.linear", "double_stream_modulation_txt.lin", 0),
    (r"single_stream_modulation\.linear", "single_stream_modulation.lin", 0),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0), (r"proj_out", "final_layer.linear", 0),
]
_FLUX1_BLOCKS = _BLOCK_QKV + [
    (_T + r"ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", 0), (_T + r"ff\.net\.2", r"double_blocks.\1.img_mlp.2", 0),
    (_T + r"ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", 0),
    (_T + r"ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", 0),
    (_S + r"attn\.to_q", r"single_blocks.\1.linear1", 0), (_S + r"attn\.to_k", r"single_blocks.\1.linear1", 1),
    (_S + r"attn\.to_v", r"single_blocks.\1.linear1", 2), (_S + r"proj_mlp", r"single_blocks.\1.linear1", 3),
    (_S + r"proj_out", r"single_blocks.\1.linear2", 0),
    (r"x_embedder", "img_in", 0), (r"context_embedder", "txt_in", 0), (r"proj_out", "final_layer.linear", 0),
]
CHROMA_NAMES = _FLUX1_BLOCKS + [
    (r"distilled_guidance_layer\.(in_proj|out_proj)", r"distilled_guidance_layer.\1", 0),
    (rf"distilled_guidance_layer\.layers\.{_I}\.linear_1", r"distilled_guidance_layer.layers.\1.in_layer", 0),
    (rf"distilled_guidance_layer\.layers\.{_I}\.linear_2", r"distilled_guidance_layer.layers.\1.out_layer", 0),
]
FLUX1_NAMES = _FLUX1_BLOCKS + [
    (_T + r"norm1\.linear", r"double_blocks.\1.img_mod.lin", 0),
    (_T + r"norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", 0),
    (_S + r"norm\.linear", r"single_blocks.\1.modulation.lin", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0),
]
_J = r"joint_blocks.\1."
MMDIT_NAMES = [
    (_T + r"attn\.to_q", _J + "x_block.attn.qkv", 0), (_T + r"attn\.to_k", _J + "x_block.attn.qkv", 1),
    (_T + r"attn\.to_v", _J + "x_block.attn.qkv", 2), (_T + r"attn\.to_out\.0", _J + "x_block.attn.proj", 0),
    (_T + r"attn2\.to_q", _J + "x_block.attn2.qkv", 0), (_T + r"attn2\.to_k", _J + "x_block.attn2.qkv", 1),
    (_T + r"attn2\.to_v", _J + "x_block.attn2.qkv", 2), (_T + r"attn2\.to_out\.0", _J + "x_block.attn2.proj", 0),
    (_T + r"ff\.net\.0\.proj", _J + "x_block.mlp.fc1", 0), (_T + r"ff\.net\.2", _J + "x_block.mlp.fc2", 0),
    (_T + r"norm1\.linear", _J + "x_block.adaLN_modulation.1", 0),
    (_T + r"attn\.add_q_proj", _J + "context_block.attn.qkv", 0),
    (_T + r"attn\.add_k_proj", _J + "context_block.attn.qkv", 1),
    (_T + r"attn\.add_v_proj", _J + "context_block.attn.qkv", 2),
    (_T + r"attn\.to_add_out", _J + "context_block.attn.proj", 0),
    (_T + r"ff_context\.net\.0\.proj", _J + "context_block.mlp.fc1", 0),
    (_T + r"ff_context\.net\.2", _J + "context_block.mlp.fc2", 0),
    (_T + r"norm1_context\.linear", _J + "context_block.adaLN_modulation.1", 0),
    (r"pos_embed\.proj", "x_embedder.proj", 0), (r"context_embedder", "context_embedder", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", 0),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0), (r"proj_out", "final_layer.linear", 0),
]
NAMES = {"flux2": FLUX2_NAMES, "chroma": CHROMA_NAMES, "flux": FLUX1_NAMES, "sd3": MMDIT_NAMES, "hidream": None}


def original(arch: str, name: str) -> tuple[str, int] | None:
    table = NAMES[arch]
    if table is None:
        return name, 0  # HiDream: diffusers names are the original names
    for pattern, template, position in table:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(template), position
    return None


def swapped(arch: str, name: str, shape) -> bool:
    """Original modules whose output halves are (shift, scale) where diffusers has (scale, shift):
    BFL/MMDiT final modulation, and SD3's last context block (2 chunks, not 6)."""
    if name == "final_layer.adaLN_modulation.1":
        return arch != "hidream"
    return arch == "sd3" and name.endswith("context_block.adaLN_modulation.1") and shape[0] == 2 * shape[1]


def swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def groups(arch: str, names) -> dict[str, list[str]]:
    """{original name: [diffusers members in row order]} for the given diffusers module names."""
    found: dict[str, dict[int, str]] = {}
    for name in names:
        placed = original(arch, name)
        assert placed is not None, (arch, name)
        found.setdefault(placed[0], {})[placed[1]] = name
    return {o: [members[p] for p in sorted(members)] for o, members in found.items()}


# --------------------------------------------------------------------------------------------
# canonical factors → files as the tools write them

def random_factors(mods: dict, seed: int, ranks=(2, 3, 1, 4), alphas=(1.0, 3.0, None, 8.0), fused_groups=None,
                   dtype=torch.float32) -> dict:
    """{(component, name): (up, down, alpha)} with ranks and alphas varying per module; members of
    one fused original module share rank, alpha and down (as kohya fuses them). Rounded to
    ``dtype`` (the values the file will hold)."""
    gen = torch.Generator().manual_seed(seed)
    factors, shared = {}, {}
    member_of = {m: (o, ms) for o, ms in (fused_groups or {}).items() for m in ms if len(ms) > 1}
    for i, (key, module) in enumerate(sorted(mods.items())):
        w = module.weight
        n = w[0].numel()
        group = member_of.get(key[1])
        r, alpha = ranks[i % len(ranks)], alphas[i % len(alphas)]
        if group and group[0] in shared:
            r, alpha, down = shared[group[0]]
        else:
            down = (torch.randn(r, *w.shape[1:], generator=gen) / n ** 0.5).to(dtype)
            if group:
                shared[group[0]] = (r, alpha, down)
        up = (torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=gen) * 0.5 / r ** 0.5).to(dtype)
        factors[key] = (up, down, alpha)
    return factors


def _scale(up, down, alpha):
    r = down.shape[0]
    return (alpha if alpha else r) / r


def write_original(path, arch: str, factors: dict, prefix: str, style: str, dtype=torch.float32,
                   metadata: dict | None = None, flat: bool = False) -> dict:
    """Original (BFL/MMDiT) names: ``style`` kohya → lora_down/lora_up/.alpha (fused modules: the
    members' shared down, ups stacked); peft → lora_A/lora_B with the scale folded (ai-toolkit)."""
    sd = {}
    names = [n for c, n in factors if c == "transformer"]
    for orig, members in groups(arch, names).items():
        ups = [factors[("transformer", m)][0] for m in members]
        _, down, alpha = factors[("transformer", members[0])]
        if len(members) > 1:
            assert all(torch.equal(factors[("transformer", m)][1], down) for m in members), orig
        up = torch.cat(ups, dim=0)
        if swapped(arch, orig, (up.shape[0], down[0].numel())):
            up = swap(up)
        _put(sd, prefix + (orig.replace(".", "_") if flat else orig), up, down, alpha, style, dtype)
    return _save(sd, path, metadata)


def _put(sd: dict, key: str, up, down, alpha, style: str, dtype) -> None:
    """One module's keys: kohya keeps the alpha, peft (ai-toolkit) folds the scale into lora_B."""
    if style == "kohya":
        sd[f"{key}.lora_down.weight"] = down.to(dtype)
        sd[f"{key}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    else:
        sd[f"{key}.lora_A.weight"] = down.to(dtype)
        sd[f"{key}.lora_B.weight"] = (up.double() * _scale(up, down, alpha)).to(dtype)


def _save(sd: dict, path, metadata) -> dict:
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return sd


def write_diffusers_style(path, factors: dict, prefix: str, style: str, dtype=torch.float32, metadata=None) -> dict:
    """diffusers module names under ``prefix``, flattened when the prefix is kohya-like
    (OneTrainer's lora_transformer_, lycoris_); kohya style keeps alphas, peft style folds them."""
    sd = {}
    flat = prefix.endswith("_")
    for (component, name), (up, down, alpha) in factors.items():
        _put(sd, prefix + (name.replace(".", "_") if flat else name), up, down, alpha, style, dtype)
    return _save(sd, path, metadata)


def delta64(up, down, alpha, shape) -> torch.Tensor:
    """ΔW = alpha/r · up @ down in float64, in the weight's shape."""
    r = down.shape[0]
    return (_scale(up, down, alpha) * (up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1))).reshape(shape)


def expected(mods: dict, inputs: list[dict], weights) -> dict:
    """{key: (base + Σ wᵢΔWᵢ, Σ wᵢΔWᵢ)} in float64 from the input tensors."""
    out = {}
    for key, module in mods.items():
        w0 = module.weight.detach().double()
        delta = torch.zeros_like(w0)
        for factors, w in zip(inputs, weights):
            if key in factors:
                delta += w * delta64(*factors[key], w0.shape)
        out[key] = (w0 + delta, delta)
    return out


# --------------------------------------------------------------------------------------------
# single-file checkpoints in original names, from a tiny transformer

_BFL_NORMS = [
    (_T + r"attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (_T + r"attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (_T + r"attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (_T + r"attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (_S + r"attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (_S + r"attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]
NORMS = {  # non-Linear parameters in original names (for diffusers' converters)
    "flux2": _BFL_NORMS,
    "flux": _BFL_NORMS,
    "chroma": _BFL_NORMS + [(rf"distilled_guidance_layer\.norms\.{_I}\.weight", r"distilled_guidance_layer.norms.\1.scale")],
    "sd3": [
        (r"pos_embed\.pos_embed", "pos_embed"),
        (_T + r"attn\.norm_q\.weight", _J + "x_block.attn.ln_q.weight"),
        (_T + r"attn\.norm_k\.weight", _J + "x_block.attn.ln_k.weight"),
        (_T + r"attn\.norm_added_q\.weight", _J + "context_block.attn.ln_q.weight"),
        (_T + r"attn\.norm_added_k\.weight", _J + "context_block.attn.ln_k.weight"),
        (_T + r"attn2\.norm_q\.weight", _J + "x_block.attn2.ln_q.weight"),
        (_T + r"attn2\.norm_k\.weight", _J + "x_block.attn2.ln_k.weight"),
    ],
}


def single_file_state(arch: str, model, prefix: str = "") -> dict:
    """The transformer's Linear weights (and biases) in original names, fused and swapped as the
    original checkpoints store them, plus the norm scales listed in NORMS; other parameters keep
    their diffusers names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    lin = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for orig, members in groups(arch, sorted(lin)).items():
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{m}.{kind}") for m in members if f"{m}.{kind}" in sd]
            if not parts:
                continue
            t = torch.cat(parts, dim=0)
            cols = parts[0][0].numel() if kind == "weight" else model.get_submodule(members[0]).weight[0].numel()
            if swapped(arch, orig, (t.shape[0], cols)):
                t = swap(t)
            out[f"{prefix}{orig}.{kind}"] = t
    for key in list(sd):
        for pattern, template in NORMS.get(arch, []):
            match = re.fullmatch(pattern, key)
            if match:
                out[prefix + match.expand(template)] = sd.pop(key)
                break
    out.update({prefix + k: v for k, v in sd.items()})
    return out


# --------------------------------------------------------------------------------------------
# LyCORIS LoKr: ΔW = alpha/r · kron(w1, w2_a @ w2_b)

def lokr_tensors(shape, seed: int, r: int = 2, p: int = 4) -> dict:
    """LoKr factors of a (out, in) weight: w1 p×p full, w2 = w2_a (out/p × r) @ w2_b (r × in/p)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = shape[0], shape[1]
    assert out % p == 0 and inp % p == 0, shape
    return {"lokr_w1": torch.randn(p, p, generator=gen),
            "lokr_w2_a": torch.randn(out // p, r, generator=gen) / r ** 0.5,
            "lokr_w2_b": torch.randn(r, inp // p, generator=gen) / (inp // p) ** 0.5}


def kron_apply(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) @ x without forming the Kronecker product (float64)."""
    p, q = w1.shape
    m, n = w2.shape
    X = x.double().reshape(q, n)
    return (w1.double() @ X @ w2.double().T).reshape(p * m)


def lokr_apply(t: dict, x: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """(alpha/r)·kron(w1, w2_a@w2_b) @ x, float64; alpha None: the factors already hold the scale."""
    w2 = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
    scale = 1.0 if alpha is None else alpha / t["lokr_w2_b"].shape[0]
    return scale * kron_apply(t["lokr_w1"], w2, x)


def write_diffusers(path, factors: dict, dtype=torch.float32) -> None:
    """diffusers/PEFT names with alphas in lora_adapter_metadata (tiny.write_diffusers), each
    tensor its own copy (fused members share their down factor in memory)."""
    tiny.write_diffusers(path, {k: (u.to(dtype).clone(), d.to(dtype).clone(), a) for k, (u, d, a) in factors.items()})
