"""Video architectures — Wan 2.1/2.2, HunyuanVideo, LTX-2, LTX-Video — checked against diffusers
0.42 itself and against ΔW computed here in float64 from the files' own tensors.

- Every format people download: a full-size synthetic file (real names and widths, rank 1–2)
  read by loramerge gives the module set, and each module the ΔW, that diffusers' own converter
  (``<Pipeline>.lora_state_dict``) gives — or, where diffusers is wrong or refuses the file, its
  behaviour is pinned and loramerge's reading is checked against the reference computed here.
- diffusers' loader + fuse on tiny transformers of the real classes loading loramerge's merged
  output; per-block weights; convert round trips; fuse into folders and single files; attach;
  extract; inspect / analyze.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loramerge
import tiny_video as tv
from loramerge.errors import AmbiguousArchitectureError, LoraMergeError, UnsupportedModuleError, UsageError
from loramerge.formats.schemes.diffusers import DIFFUSERS
from loramerge.formats.schemes.hunyuan import HUNYUAN, HUNYUAN_COMFY
from loramerge.formats.schemes.ltx import LTX, LTX2_CONNECTORS
from loramerge.formats.schemes.wan import WAN

torch.set_num_threads(1)

# what the trainers target: attention and feed-forward projections of every block
WAN_BLOCKS = r"^blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0|add_[kv]_proj)|ffn\.net\.(0\.proj|2))$"
WAN_14B_I2V = "wan2.1-i2v-14b-480p"
RANKS = (1, 2)


def per_module(values, salt: int = 0):
    """A per-module value (rank or alpha) that differs between neighbouring modules."""
    return lambda name: values[(sum(map(ord, name)) + salt) % len(values)]


def converted(pipeline_cls, path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """diffusers' conversion of a file: {component prefix: {module: {lora_A/lora_B/...: tensor}}}."""
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in pipeline_cls.lora_state_dict(str(path)).items():
        component, _, rest = key.partition(".")
        name, _, role = rest.rpartition(".lora_")
        out.setdefault(component, {}).setdefault(name, {})[role.removesuffix(".weight")] = value
    return out


_PROBES: dict[int, torch.Tensor] = {}


def probe(n: int) -> torch.Tensor:
    if n not in _PROBES:
        _PROBES[n] = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    return _PROBES[n]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ours_probe(module) -> torch.Tensor:
    up, down = module.factors(torch.float64)
    return module.scale * (up @ (down @ probe(down.shape[1])))


def theirs_probe(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    a, b = factors["A"].double(), factors["B"].double()
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return b @ (a @ probe(a.shape[1]))


def ref_probe(uv) -> torch.Tensor:
    u, d = uv
    return u @ (d @ probe(d.shape[1]))


def assert_reads_as(lora, reference: dict[tuple[str, str], tuple], tol=1e-6):
    """loramerge's modules are exactly the reference's, each with the reference ΔW."""
    assert set(lora.modules) == {f"{c}.{n}" for c, n in reference}
    for (component, name), uv in reference.items():
        got = lora[f"{component}.{name}"]
        assert rel(ours_probe(got), ref_probe(uv)) < tol, (component, name)


def assert_diffusers_agrees(theirs: dict[str, dict], reference: dict[tuple[str, str], tuple], tol=1e-6):
    """diffusers' converted modules are exactly the reference's, each with the reference ΔW."""
    got = {(c, n) for c, mods in theirs.items() for n in mods}
    assert got == set(reference)
    for (component, name), uv in reference.items():
        assert rel(theirs_probe(theirs[component][name]), ref_probe(uv)) < tol, (component, name)


def check_file(path, ref, expect: tuple, pipeline_cls=None, variants=None):
    """loramerge reads ``path`` as ``expect`` (arch, format, variant), with the variants it
    leaves open, and exactly the reference's modules and ΔW; so does diffusers, if given."""
    lora = loramerge.load(path)
    assert (lora.arch, lora.format, lora.variant) == expect
    if variants is not None:
        assert set(lora.variants) == set(variants)
    assert_reads_as(lora, ref)
    if pipeline_cls is not None:
        assert_diffusers_agrees(converted(pipeline_cls, path), ref)
    return lora


def reference(modules, shapes, component="transformer"):
    return {(component, n): uv for n, uv in tv.member_factors(modules, shapes).items()}


# ============================================================================================
# key tables


@pytest.mark.parametrize("variant", ["wan2.1-flf2v-14b", "wan2.2-t2v-a14b", "hunyuanvideo-i2v-33ch", "ltx2.3",
                                     "ltx-video-0.9-2b"])
def test_shipped_tables_match_the_real_models(variant):
    """The key tables equal what the real full-size models (built on meta from the configs)
    enumerate — one variant per config family."""
    from loramerge.formats import keymaps

    for component, config in keymaps.configs()[variant].items():
        model = keymaps.build_model(config, "meta")
        assert keymaps.table(variant)[component] == {k: tuple(v) for k, v in keymaps.module_shapes(model).items()}


# ============================================================================================
# Wan: every format, full size


def wan_shapes(variant=WAN_14B_I2V, pattern=WAN_BLOCKS, blocks=None):
    shapes = tv.table(variant, pattern=pattern)
    if blocks is not None:
        shapes = {n: s for n, s in shapes.items() if not n.startswith("blocks.") or int(n.split(".")[1]) in blocks}
    return shapes


def test_wan_comfyui_ai_toolkit_full_size_matches_diffusers(tmp_path):
    """``diffusion_model.`` + Wan names, lora_A/lora_B (ai-toolkit, diffusion-pipe): all 40 blocks
    of Wan 2.1 I2V-14B with the image cross-attention and the embedders and head."""
    shapes = wan_shapes(pattern=WAN_BLOCKS[:-1] + r"|^condition_embedder\.|^proj_out$")
    shapes.pop("condition_embedder.time_proj")  # [30720, 5120]: kept to the kohya test's memory budget
    modules = tv.write(tmp_path / "a.safetensors", tv.file_modules(shapes, WAN, RANKS[0], None, 1),
                       "diffusion_model.", dtype=torch.float16)
    from diffusers import WanPipeline

    check_file(tmp_path / "a.safetensors", reference(modules, shapes), ("wan", "comfyui", None), WanPipeline,
               {"wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "wan2.1-flf2v-14b"})


def test_wan_comfyui_kohya_factors_alpha_and_bias_deltas(tmp_path):
    """ComfyUI-world extractions (lightx2v, CausVid): lora_down/lora_up + .alpha + diff_b, with
    ranks and alphas differing per module (blocks 0, 1, 39: a few blocks' worth of a 14B).
    diffusers' converter consumes .alpha only inside blocks: an alpha on ``head.head`` or
    ``time_projection.1`` makes it raise (pinned); loramerge reads it."""
    shapes = wan_shapes(pattern=WAN_BLOCKS[:-1] + r"|^condition_embedder\.time_proj$|^proj_out$", blocks=(0, 1, 39))
    alphas = per_module((1.0, 0.5, 3.0))
    modules = tv.file_modules(shapes, WAN, per_module((1, 2)), lambda n: alphas(n) if n.startswith("blocks") else None, 2)
    modules = tv.write(tmp_path / "b.safetensors", modules, "diffusion_model.", style="kohya")
    biases = {n: torch.randn(shapes[n][0], generator=torch.Generator().manual_seed(i)) * 0.01
              for i, n in enumerate(["blocks.0.attn1.to_q", "blocks.39.ffn.net.2", "proj_out"])}
    extra = {f"diffusion_model.{WAN.encode(n)[0].name}.diff_b": b for n, b in biases.items()}
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        extra.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(extra, str(tmp_path / "b.safetensors"))
    ref = reference(modules, shapes)
    lora = loramerge.load(tmp_path / "b.safetensors")
    assert lora.arch == "wan" and lora.format == "comfyui"
    assert_reads_as(lora, ref)
    for name, bias in biases.items():
        assert torch.equal(lora[f"transformer.{name}"].bias_delta(), bias)
    from diffusers import WanPipeline

    theirs = converted(WanPipeline, tmp_path / "b.safetensors")
    assert_diffusers_agrees(theirs, ref)
    for name, bias in biases.items():
        assert torch.equal(theirs["transformer"][name]["B.bias"], bias)
    save_file({**extra, "diffusion_model.head.head.alpha": torch.tensor(2.0)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="head.head.alpha"):
        WanPipeline.lora_state_dict(str(tmp_path / "b.safetensors"))
    head = modules["head.head"]
    head_ref = {**ref, ("transformer", "proj_out"): (2.0 / head.down.shape[0] * head.up.double(), head.down.double())}
    assert_reads_as(loramerge.load(tmp_path / "b.safetensors"), head_ref)


def test_wan_lightx2v_head_diff_is_a_full_module(tmp_path):
    """``head.head.diff`` (a full 2-D delta, lightx2v's distill LoRAs) reads as a full module of
    that delta — diffusers loads it as lora_A = the delta, lora_B = identity: the same ΔW."""
    shapes = wan_shapes("wan2.2-t2v-a14b", blocks=(0,))
    modules = tv.write(tmp_path / "h.safetensors", tv.file_modules(shapes, WAN, 1, 1.0, 3), "diffusion_model.",
                       style="kohya")
    diff = torch.randn(64, 5120, generator=torch.Generator().manual_seed(3)) * 0.01
    diff_b = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 0.01
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**sd, "diffusion_model.head.head.diff": diff, "diffusion_model.head.head.diff_b": diff_b},
              str(tmp_path / "h.safetensors"))
    lora = loramerge.load(tmp_path / "h.safetensors")
    head = lora["transformer.proj_out"]
    assert head.kind == "full" and torch.allclose(head.delta(torch.float64), diff.double(), rtol=0, atol=1e-12)
    assert torch.equal(head.bias_delta(), diff_b)
    from diffusers import WanPipeline

    theirs = converted(WanPipeline, tmp_path / "h.safetensors")["transformer"]["proj_out"]
    assert torch.allclose(theirs["B"].double() @ theirs["A"].double(), diff.double(), rtol=0, atol=1e-12)
    assert_reads_as(loramerge.load(tmp_path / "h.safetensors"),
                    {**reference(modules, shapes), ("transformer", "proj_out"): (torch.eye(64).double(), diff.double())})


def test_wan_norm_deltas_are_read_as_vector_deltas(tmp_path):
    """1-D ``.diff``/``.diff_b`` keys (norm weights; lightx2v and Kijai extractions) are additive
    deltas of the norm's weight and bias — the original ``norm3`` is diffusers' ``norm2``.
    diffusers drops them (with a debug log); ComfyUI applies them."""
    shapes = wan_shapes(blocks=(0,))
    tv.write(tmp_path / "n.safetensors", tv.file_modules(shapes, WAN, 1, None, 5), "diffusion_model.")
    with safe_open(str(tmp_path / "n.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    weight = torch.randn(5120, generator=torch.Generator().manual_seed(7)) * 0.01
    bias = torch.randn(5120, generator=torch.Generator().manual_seed(8)) * 0.01
    save_file({**sd, "diffusion_model.blocks.0.norm3.diff": weight, "diffusion_model.blocks.0.norm3.diff_b": bias},
              str(tmp_path / "n.safetensors"))
    norm = loramerge.load(tmp_path / "n.safetensors")["transformer.blocks.0.norm2"]
    assert norm.is_vector and torch.equal(norm.delta().reshape(-1), weight) and torch.equal(norm.bias_delta(), bias)
    loramerge.save(loramerge.load(tmp_path / "n.safetensors"), tmp_path / "back.safetensors", format="comfyui")
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("diffusion_model.blocks.0.norm3.diff"), weight)


def test_wan_musubi_full_size_matches_diffusers(tmp_path):
    """musubi-tuner: ``lora_unet_`` + flattened Wan names, .alpha; every block of Wan 2.1 T2V-1.3B
    (diffusers' musubi converter needs all ten projections of every block)."""
    shapes = wan_shapes("wan2.1-t2v-1.3b")
    modules = tv.write(tmp_path / "m.safetensors", tv.file_modules(shapes, WAN, per_module((1, 2)), per_module((1.0, 4.0)), 6),
                       "lora_unet_", style="kohya", flat=True, metadata={"modelspec.architecture": "wan2.1/lora"})
    from diffusers import WanPipeline

    check_file(tmp_path / "m.safetensors", reference(modules, shapes), ("wan", "kohya", "wan2.1-t2v-1.3b"), WanPipeline)


def test_wan_musubi_partial_and_wan_fun_files_diffusers_refuses(tmp_path):
    """A musubi file on some blocks and projections only, and VideoX-Fun's ``lora_unet__``
    spelling: diffusers' musubi converter raises on both (pinned); loramerge reads them as
    diffusers reads the same tensors in ComfyUI spelling."""
    from diffusers import WanPipeline

    shapes = {n: s for n, s in wan_shapes("wan2.2-ti2v-5b", blocks=(0, 7, 29)).items() if "attn2" not in n}
    modules = tv.file_modules(shapes, WAN, 2, 1.0, 7)
    modules = tv.write(tmp_path / "p.safetensors", modules, "lora_unet_", style="kohya", flat=True)
    tv.write(tmp_path / "fun.safetensors", modules, "lora_unet__", style="kohya", flat=True)
    tv.write(tmp_path / "same.safetensors", modules, "diffusion_model.", style="kohya")
    with pytest.raises(KeyError):
        WanPipeline.lora_state_dict(str(tmp_path / "p.safetensors"))
    with pytest.raises(KeyError):
        WanPipeline.lora_state_dict(str(tmp_path / "fun.safetensors"))
    ref = reference(modules, shapes)
    assert_diffusers_agrees(converted(WanPipeline, tmp_path / "same.safetensors"), ref)
    for name, label in (("p", "kohya"), ("fun", "videox-fun")):
        lora = loramerge.load(tmp_path / f"{name}.safetensors")
        assert (lora.arch, lora.format, lora.variant) == ("wan", label, "wan2.2-ti2v-5b")
        assert_reads_as(lora, ref)


def test_wan_diffsynth_bare_keys_diffusers_drops(tmp_path):
    """DiffSynth-Studio: bare Wan names with PEFT's ``.default`` infix. diffusers passes them
    through unprefixed and its loader then drops every key (pinned)."""
    from diffusers import WanPipeline

    shapes = wan_shapes("wan2.1-t2v-14b", blocks=(0, 39))
    modules = tv.write(tmp_path / "d.safetensors", tv.file_modules(shapes, WAN, 1, None, 8), "", infix=".default")
    theirs = converted(WanPipeline, tmp_path / "d.safetensors")
    assert "transformer" not in theirs and "blocks" in theirs  # no transformer. prefix: nothing loads
    lora = loramerge.load(tmp_path / "d.safetensors")
    assert (lora.arch, lora.format) == ("wan", "diffsynth")
    # blocks alone: every 14B model fits (2.1 T2V / I2V 480P, 720P / FLF2V, either 2.2 expert)
    assert lora.variant is None and set(lora.variants) == {"wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p",
                                                           "wan2.1-flf2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"}
    assert_reads_as(lora, reference(modules, shapes))


def test_wan22_ai_toolkit_combined_file_holds_both_experts(tmp_path):
    """ai-toolkit's combined Wan 2.2 A14B file (``diffusion_model.transformer_1.`` high noise,
    ``…transformer_2.`` low noise): diffusers' converter fails on it (pinned); loramerge reads
    the experts as components transformer and transformer_2, each as diffusers reads it alone."""
    from diffusers import WanPipeline

    shapes = wan_shapes("wan2.2-i2v-a14b", blocks=(0, 39))
    high = tv.file_modules(shapes, WAN, 1, None, 9)
    low = tv.file_modules(shapes, WAN, 2, None, 10)
    tv.write(tmp_path / "hi.safetensors", high, "diffusion_model.")
    tv.write(tmp_path / "lo.safetensors", low, "diffusion_model.")
    with safe_open(str(tmp_path / "hi.safetensors"), "pt") as f, safe_open(str(tmp_path / "lo.safetensors"), "pt") as g:
        combined = {k.replace("diffusion_model.", "diffusion_model.transformer_1."): f.get_tensor(k) for k in f.keys()}
        combined.update({k.replace("diffusion_model.", "diffusion_model.transformer_2."): g.get_tensor(k) for k in g.keys()})
    save_file(combined, str(tmp_path / "both.safetensors"))
    with pytest.raises(ValueError):
        WanPipeline.lora_state_dict(str(tmp_path / "both.safetensors"))
    lora = loramerge.load(tmp_path / "both.safetensors")
    assert lora.arch == "wan" and lora.components == ["transformer", "transformer_2"]
    assert set(lora.variants) == {"wan2.2-t2v-a14b", "wan2.2-i2v-a14b"}  # only 2.2 has a second expert
    ref = {**reference(high, shapes), **reference(low, shapes, "transformer_2")}
    assert_reads_as(lora, ref)
    assert_diffusers_agrees({"transformer": converted(WanPipeline, tmp_path / "hi.safetensors")["transformer"]},
                            reference(high, shapes))
    assert_diffusers_agrees({"transformer_2": converted(WanPipeline, tmp_path / "lo.safetensors")["transformer"]},
                            reference(low, shapes, "transformer_2"))


def test_wan_diffusers_format_and_patch_embedding(tmp_path):
    """diffusers' own names pass through its loader unchanged; a LoRA on the Conv3d
    ``patch_embedding`` reads exactly (diffusers' ComfyUI-format converter has no rule for it
    and raises, pinned)."""
    from diffusers import WanPipeline

    shapes = wan_shapes("wan2.2-ti2v-5b", pattern=WAN_BLOCKS[:-1] + r"|^patch_embedding$", blocks=(0, 29))
    modules = tv.write(tmp_path / "w.safetensors", tv.file_modules(shapes, DIFFUSERS, 2, None, 11), "transformer.")
    lora = check_file(tmp_path / "w.safetensors", reference(modules, shapes), ("wan", "diffusers", "wan2.2-ti2v-5b"),
                      WanPipeline)  # patch_embedding's 48 input channels: the 5B
    assert lora["transformer.patch_embedding"].shape == (3072, 48, 1, 2, 2)
    tv.write(tmp_path / "c.safetensors", tv.file_modules(shapes, WAN, 2, None, 11), "diffusion_model.")
    with pytest.raises(ValueError, match="patch_embedding"):
        WanPipeline.lora_state_dict(str(tmp_path / "c.safetensors"))


# ============================================================================================
# HunyuanVideo: every format, full size

HV_REFINER_QKV = r"token_refiner\.refiner_blocks\.\d+\.attn\.to_[qkv]$"


def hv_shapes(variant="hunyuanvideo", pattern=None, blocks=None):
    shapes = tv.table(variant, pattern=pattern)
    if blocks is not None:  # keep these block indices of every block kind
        import re

        shapes = {n: s for n, s in shapes.items()
                  if not re.search(r"blocks\.\d+\.", n) or int(re.search(r"blocks\.(\d+)\.", n).group(1)) in blocks}
    return shapes


def without(shapes, pattern):
    import re

    return {n: s for n, s in shapes.items() if not re.search(pattern, n)}


def test_hunyuan_comfyui_full_size_matches_diffusers(tmp_path):
    """``diffusion_model.`` + Tencent names, fused qkv / linear1 (ComfyUI, musubi's
    ``convert_lora.py --target other``): every module of HunyuanVideo but the two diffusers
    mis-converts (next test), split exactly."""
    from diffusers import HunyuanVideoPipeline

    shapes = without(hv_shapes(), HV_REFINER_QKV + r"|^norm_out\.linear$")
    modules = tv.write(tmp_path / "c.safetensors", tv.file_modules(shapes, HUNYUAN, 1, None, 20), "diffusion_model.",
                       dtype=torch.float16)
    # img_in in 16 channels: T2V or the 16-channel I2V, not the 33-channel I2V
    check_file(tmp_path / "c.safetensors", reference(modules, shapes), ("hunyuanvideo", "comfyui", None),
               HunyuanVideoPipeline, {"hunyuanvideo", "hunyuanvideo-i2v"})


def test_hunyuan_refiner_qkv_and_final_layer_diffusers_bugs(tmp_path):
    """diffusers 0.42 chunks the token refiner's fused ``self_attn_qkv`` down factor in three
    along the rank (rank-1 down against a rank-3 up: unloadable) and swaps the rank halves of
    the final ``adaLN_modulation`` down factor with the up rows (a wrong ΔW) — pinned;
    loramerge splits the one and swaps only the up rows of the other."""
    from diffusers import HunyuanVideoPipeline

    shapes = hv_shapes(pattern=HV_REFINER_QKV + r"|^norm_out\.linear$|^transformer_blocks\.0\.attn\.to_[qkv]$")
    modules = tv.write(tmp_path / "b.safetensors", tv.file_modules(shapes, HUNYUAN, 3, None, 21), "transformer.")
    ref = reference(modules, shapes)
    assert_reads_as(loramerge.load(tmp_path / "b.safetensors", arch="hunyuanvideo"), ref)
    theirs = converted(HunyuanVideoPipeline, tmp_path / "b.safetensors")["transformer"]
    refiner_q = theirs["context_embedder.token_refiner.refiner_blocks.0.attn.to_q"]
    assert refiner_q["A"].shape[0] == 1 and refiner_q["B"].shape[1] == 3  # ranks disagree
    assert rel(theirs_probe(theirs["norm_out.linear"]), ref_probe(ref[("transformer", "norm_out.linear")])) > 0.1
    assert rel(theirs_probe(theirs["transformer_blocks.0.attn.to_q"]),
               ref_probe(ref[("transformer", "transformer_blocks.0.attn.to_q")])) < 1e-6


def test_hunyuan_musubi_diffusion_pipe_comfy_spellings(tmp_path):
    """musubi's kohya file (``lora_unet_double_blocks_0_img_attn_qkv`` + .alpha; diffusers sends
    it to its Tencent converter, which splits the .alpha like a qkv factor and raises — pinned), diffusion-pipe's ``transformer.`` +
    Tencent names (diffusers converts it), ComfyUI's own embedder spelling (``time_in.in_layer``,
    which diffusers leaves unconverted — pinned): all read as the same modules."""
    from diffusers import HunyuanVideoPipeline

    blocks = without(hv_shapes(pattern=r"^(single_)?transformer_blocks\.", blocks=(0, 19, 39)), r"norm1?(_context)?\.linear$")
    modules = tv.file_modules(blocks, HUNYUAN, per_module((1, 2)), per_module((1.0, 2.0)), 22)
    musubi = tv.write(tmp_path / "m.safetensors", modules, "lora_unet_", style="kohya", flat=True)
    pipe = tv.write(tmp_path / "p.safetensors", musubi, "transformer.")  # the same ΔW, alpha folded
    ref = reference(musubi, blocks)
    with pytest.raises(RuntimeError, match="chunk"):  # it chunks the 0-d .alpha as a qkv up factor
        HunyuanVideoPipeline.lora_state_dict(str(tmp_path / "m.safetensors"))
    for name, label in (("m", "kohya"), ("p", "diffusion-pipe")):
        lora = loramerge.load(tmp_path / f"{name}.safetensors")
        assert (lora.arch, lora.format) == ("hunyuanvideo", label)
        assert_reads_as(lora, ref)
    assert_diffusers_agrees(converted(HunyuanVideoPipeline, tmp_path / "p.safetensors"), reference(pipe, blocks))

    embedders = hv_shapes(pattern=r"time_text_embed\.(timestep|guidance)_embedder|^transformer_blocks\.0\.attn\.to_[qkv]$")
    comfy = tv.write(tmp_path / "e.safetensors", tv.file_modules(embedders, HUNYUAN_COMFY, 1, None, 23), "diffusion_model.")
    assert "time_in.in_layer" in comfy and "double_blocks.0.img_attn_qkv" in comfy
    lora = loramerge.load(tmp_path / "e.safetensors")
    assert lora.arch == "hunyuanvideo"
    assert_reads_as(lora, reference(comfy, embedders))
    theirs = converted(HunyuanVideoPipeline, tmp_path / "e.safetensors")["transformer"]
    assert "time_in.in_layer" in theirs and "time_text_embed.timestep_embedder.linear_1" not in theirs


def test_hunyuan_diffusers_format_and_33ch_variant(tmp_path):
    """diffusers names pass through diffusers unchanged; the ``x_embedder`` Conv3d of the
    33-channel I2V model determines that variant."""
    from diffusers import HunyuanVideoPipeline

    shapes = hv_shapes("hunyuanvideo-i2v-33ch", pattern=r"^x_embedder|^(single_)?transformer_blocks\.\d+\.attn\.to_q$",
                       blocks=(0, 39))
    modules = tv.write(tmp_path / "d.safetensors", tv.file_modules(shapes, DIFFUSERS, 2, None, 24), "transformer.")
    check_file(tmp_path / "d.safetensors", reference(modules, shapes), ("hunyuanvideo", "diffusers", "hunyuanvideo-i2v-33ch"),
               HunyuanVideoPipeline)


def test_flux_and_hunyuan_share_names_detection(tmp_path):
    """Flux and HunyuanVideo spell double-block qkv the same in kohya files and share diffusers
    block names at the same width. A file of such modules only is ambiguous (candidates and the
    headers that decide are named) unless its header says; a file reaching Flux's last blocks
    is Flux, one reaching HunyuanVideo's is HunyuanVideo."""
    from loramerge.formats.schemes.bfl import BFL

    qkv = {"transformer_blocks.3.attn.to_q": (3072, 3072), "transformer_blocks.3.attn.to_k": (3072, 3072),
           "transformer_blocks.3.attn.to_v": (3072, 3072)}
    tv.write(tmp_path / "q.safetensors", tv.file_modules(qkv, HUNYUAN, 1, 1.0, 25), "lora_unet_", style="kohya", flat=True)
    with pytest.raises(AmbiguousArchitectureError) as err:
        loramerge.load(tmp_path / "q.safetensors")
    # Chroma and Flux.2 klein 4B spell and size these modules as Flux.1 does
    assert set(err.value.candidates) == {"chroma", "flux", "flux2", "hunyuanvideo"} and "hunyuan-video" in str(err.value)
    tv.write(tmp_path / "q.safetensors", tv.file_modules(qkv, HUNYUAN, 1, 1.0, 25), "lora_unet_", style="kohya", flat=True,
             metadata={"modelspec.architecture": "hunyuan-video/lora"})
    assert loramerge.load(tmp_path / "q.safetensors").arch == "hunyuanvideo"

    flux = tv.table("flux", pattern=r"^(single_)?transformer_blocks\.\d+\.attn\.to_q$")
    tv.write(tmp_path / "f.safetensors", tv.file_modules(flux, DIFFUSERS, 1, None, 26), "transformer.")
    with pytest.raises(AmbiguousArchitectureError) as err:  # reaches double 18 / single 37: not HunyuanVideo
        loramerge.load(tmp_path / "f.safetensors")
    assert set(err.value.candidates) == {"chroma", "flux"}  # Chroma has Flux.1's blocks
    tv.write(tmp_path / "f.safetensors", tv.file_modules(flux, DIFFUSERS, 1, None, 26), "transformer.",
             metadata={"ss_base_model_version": "flux1"})
    assert loramerge.load(tmp_path / "f.safetensors").arch == "flux"
    hv = tv.table("hunyuanvideo", pattern=r"^(single_)?transformer_blocks\.\d+\.attn\.to_q$")
    tv.write(tmp_path / "h.safetensors", tv.file_modules(hv, DIFFUSERS, 1, None, 26), "transformer.")
    assert loramerge.load(tmp_path / "h.safetensors").arch == "hunyuanvideo"
    fused = tv.table("flux", pattern=r"^(single_)?transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$")
    tv.write(tmp_path / "b.safetensors", tv.file_modules(fused, BFL, 1, 1.0, 27), "lora_unet_", style="kohya", flat=True)
    with pytest.raises(AmbiguousArchitectureError) as err:
        loramerge.load(tmp_path / "b.safetensors")
    assert set(err.value.candidates) == {"chroma", "flux"}


# ============================================================================================
# LTX-2 and LTX-Video: every format, full size

LTX_ATTN = r"^transformer_blocks\.\d+\.(audio_)?attn[12]\.(to_[qkv]|to_out\.0)$"


def ltx_shapes(variant, pattern=None, blocks=None, component="transformer"):
    shapes = tv.table(variant, component, pattern=pattern)
    if blocks is not None:
        shapes = {n: s for n, s in shapes.items() if "blocks." not in n or int(n.split("blocks.")[1].split(".")[0]) in blocks}
    return shapes


def test_ltx2_comfyui_full_size_matches_diffusers(tmp_path):
    """``diffusion_model.`` + Lightricks names (LTX trainer, ai-toolkit, diffusion-pipe) on every
    LTX-2.3 transformer module, and ``text_embedding_projection.`` for the connectors' input
    projections: diffusers renames both exactly as loramerge reads them."""
    from diffusers import LTX2Pipeline

    shapes = ltx_shapes("ltx2.3")
    projections = ltx_shapes("ltx2.3", pattern=r"text_proj_in$", component="connectors")
    modules = tv.write(tmp_path / "t.safetensors", tv.file_modules(shapes, LTX, 1, None, 30), "diffusion_model.",
                       dtype=torch.bfloat16)
    proj = tv.file_modules(projections, LTX2_CONNECTORS, 1, None, 31)
    proj = tv.write(tmp_path / "p.safetensors", proj, "", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f, safe_open(str(tmp_path / "p.safetensors"), "pt") as g:
        save_file({**{k: f.get_tensor(k) for k in f.keys()}, **{k: g.get_tensor(k) for k in g.keys()}},
                  str(tmp_path / "l.safetensors"))
    assert "patchify_proj" in modules and "adaln_single.linear" in modules and "prompt_adaln_single.linear" in modules
    ref = {**reference(modules, shapes), **reference(proj, projections, "connectors")}
    alone = loramerge.load(tmp_path / "t.safetensors")
    assert (alone.arch, alone.format, alone.variant) == ("ltx2", "comfyui", None)
    assert set(alone.variants) == {"ltx2.3", "ltx2.5"}  # gates and prompt_adaln: 2.3 or 2.5
    lora = loramerge.load(tmp_path / "l.safetensors")
    assert lora.variant == "ltx2.3"  # per-modality text projections (2.5's connectors have no fixed table)
    assert_reads_as(lora, ref)
    assert_diffusers_agrees(converted(LTX2Pipeline, tmp_path / "l.safetensors"), ref)


def test_ltx2_connector_blocks_kohya_and_diffusers_names(tmp_path):
    """The connectors' 1-D transformer blocks as original checkpoints name them
    (``diffusion_model.video_embeddings_connector.transformer_1d_blocks.N``): diffusers routes
    them to the transformer, where no such module exists (pinned); loramerge to the connectors.
    kohya ``lora_unet_`` files are not converted by diffusers (pinned); diffusers names pass."""
    from diffusers import LTX2Pipeline

    attn = ltx_shapes("ltx2", pattern=LTX_ATTN, blocks=(0, 47))
    blocks = ltx_shapes("ltx2", pattern=r"connector\.transformer_blocks\.1\.", component="connectors")
    conn = tv.write(tmp_path / "c.safetensors", tv.file_modules(blocks, LTX2_CONNECTORS, 2, 4.0, 32), "")
    assert all(k.startswith("diffusion_model.video_embeddings_connector.transformer_1d_blocks.1.")
               or k.startswith("diffusion_model.audio_embeddings_connector.") for k in conn)
    theirs = converted(LTX2Pipeline, tmp_path / "c.safetensors")
    assert set(theirs) == {"transformer"}
    assert all(n.startswith(("video_embeddings_connector.", "audio_embeddings_connector.")) for n in theirs["transformer"])
    lora = loramerge.load(tmp_path / "c.safetensors")
    assert lora.arch == "ltx2" and lora.components == ["connectors"] and lora.variant == "ltx2"  # 30 heads × 128: 2.0's connectors
    assert_reads_as(lora, reference(conn, blocks, "connectors"))

    kohya = tv.write(tmp_path / "k.safetensors", tv.file_modules(attn, LTX, per_module((1, 2)), per_module((1.0, 8.0)), 33),
                     "lora_unet_", style="kohya", flat=True)
    assert not any(k.startswith("transformer.") for k in LTX2Pipeline.lora_state_dict(str(tmp_path / "k.safetensors")))
    lora = loramerge.load(tmp_path / "k.safetensors")
    assert (lora.arch, lora.format, lora.variant) == ("ltx2", "kohya", None)  # 2.0 / 2.3 / 2.5: same attention
    assert set(lora.variants) == {"ltx2", "ltx2.3", "ltx2.5"}
    assert_reads_as(lora, reference(kohya, attn))

    modules = tv.write(tmp_path / "d.safetensors", tv.file_modules(attn, DIFFUSERS, 1, None, 34), "transformer.")
    cmods = tv.file_modules(blocks, DIFFUSERS, 1, None, 35)
    cmods = tv.write(tmp_path / "dc.safetensors", cmods, "connectors.")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f, safe_open(str(tmp_path / "dc.safetensors"), "pt") as g:
        save_file({**{k: f.get_tensor(k) for k in f.keys()}, **{k: g.get_tensor(k) for k in g.keys()}},
                  str(tmp_path / "d.safetensors"))
    ref = {**reference(modules, attn), **reference(cmods, blocks, "connectors")}
    lora = loramerge.load(tmp_path / "d.safetensors")
    assert (lora.arch, lora.format) == ("ltx2", "diffusers")
    assert_reads_as(lora, ref)
    assert_diffusers_agrees(converted(LTX2Pipeline, tmp_path / "d.safetensors"), ref)


def test_ltx_video_comfyui_diffusers_does_not_rename(tmp_path):
    """LTX-Video 0.9: diffusers only swaps ``diffusion_model.`` for ``transformer.``, so LoRAs
    on ``patchify_proj`` / ``adaln_single`` keep names no module has (pinned); blocks agree."""
    from diffusers import LTXPipeline

    shapes = ltx_shapes("ltx-video-0.9-2b", blocks=(0, 27))
    modules = tv.write(tmp_path / "v.safetensors", tv.file_modules(shapes, LTX, 2, None, 36), "diffusion_model.")
    ref = reference(modules, shapes)
    lora = loramerge.load(tmp_path / "v.safetensors")
    assert (lora.arch, lora.format, lora.variant) == ("ltx-video", "comfyui", "ltx-video-0.9-2b")
    assert_reads_as(lora, ref)
    theirs = converted(LTXPipeline, tmp_path / "v.safetensors")["transformer"]
    assert "patchify_proj" in theirs and "proj_in" not in theirs and "adaln_single.linear" in theirs
    blocks = {k: v for k, v in ref.items() if k[1].startswith("transformer_blocks.")}
    assert_diffusers_agrees({"transformer": {n: theirs[n] for _, n in blocks}}, blocks)


def test_ltx2_video_only_lora_is_ambiguous_with_ltx_video_13b(tmp_path):
    """A LoRA on LTX-2's video attention alone has LTX-Video 0.9.7 13B's names and shapes: the
    architecture is ambiguous (both named, with the headers that decide) unless the header says."""
    shapes = ltx_shapes("ltx2", pattern=r"^transformer_blocks\.\d+\.attn[12]\.to_[qkv]$", blocks=(0, 47))
    modules = tv.file_modules(shapes, LTX, 1, None, 37)
    tv.write(tmp_path / "a.safetensors", modules, "diffusion_model.")
    with pytest.raises(AmbiguousArchitectureError) as err:
        loramerge.load(tmp_path / "a.safetensors")
    assert set(err.value.candidates) == {"ltx2", "ltx-video"}
    assert "ltx-2" in str(err.value) and "ltx-video" in str(err.value) and len(str(err.value).splitlines()) == 1
    for header, arch in (("ltx-2/lora", "ltx2"), ("ltx-video/lora", "ltx-video")):
        tv.write(tmp_path / "a.safetensors", modules, "diffusion_model.", metadata={"modelspec.architecture": header})
        assert loramerge.load(tmp_path / "a.safetensors").arch == arch


# ============================================================================================
# diffusers loads and fuses loramerge's merges (tiny transformers of the real classes)

WEIGHTS = (0.7, -0.4)

# per architecture: the tiny pipeline, the two inputs' formats (scheme, prefix, style, flat) per
# component, and the modules diffusers cannot load from the default (ComfyUI-style) format
TINY = {
    "wan": dict(
        pipe=lambda: tv.pipeline("wan", tv.wan_transformer(image=True)),
        a={"transformer": (WAN, "diffusion_model.", "kohya", False)},  # lightx2v-style
        b={"transformer": (WAN, "lora_unet_", "kohya", True)},  # musubi
        # diffusers' converter has no rule for patch_embedding (it raises)
        comfy_unloadable=r"^patch_embedding$"),
    "hunyuanvideo": dict(
        pipe=lambda: tv.pipeline("hunyuanvideo", tv.hunyuan_transformer()),
        a={"transformer": (HUNYUAN, "lora_unet_", "kohya", True)},  # musubi
        b={"transformer": (HUNYUAN, "transformer.", "peft", False)},  # diffusion-pipe
        # linear1 split at Flux's fixed 3072, refiner qkv chunked along the rank, final adaLN's
        # down swapped, ComfyUI's embedder spelling unknown to diffusers
        comfy_unloadable=r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$|refiner_blocks\.\d+\.attn\.to_[qkv]$"
                         r"|^norm_out\.linear$|^time_text_embed\.(timestep|guidance)_embedder|^context_embedder\.time_text_embed"),
    "ltx2": dict(
        pipe=lambda: tv.pipeline("ltx2", tv.ltx2_transformer(), connectors=tv.ltx2_connectors()),
        a={"transformer": (LTX, "diffusion_model.", "peft", False), "connectors": (LTX2_CONNECTORS, "", "peft", False)},
        b={"transformer": (DIFFUSERS, "transformer.", "peft", False), "connectors": (DIFFUSERS, "connectors.", "peft", False)},
        # diffusers routes diffusion_model.video_embeddings_connector.… to the transformer
        comfy_unloadable=r"connector\.transformer_blocks"),
    "ltx-video": dict(
        pipe=lambda: tv.pipeline("ltx-video", tv.ltx_video_transformer()),
        a={"transformer": (LTX, "diffusion_model.", "peft", False)},
        b={"transformer": (DIFFUSERS, "transformer.", "peft", False)},
        # diffusers only swaps the prefix: patchify_proj / adaln_single stay unrenamed
        comfy_unloadable=r"^proj_in$|^time_embed\."),
}
HEADERS = {"wan": "wan2.1/lora", "hunyuanvideo": "hunyuan-video/lora", "ltx2": "ltx-2/lora", "ltx-video": "ltx-video/lora"}


def tiny_inputs(tmp_path, arch: str, pipe, keep=lambda component, name: True):
    """Two LoRA files on the tiny pipeline in the arch's two input formats: A fp16 with ranks
    2/4 and alphas 1/2/8 per module, on every module but one; B fp32 with ranks 3/1 and alphas
    3/0.5, on block 0 and that one module. Wan's A also carries two bias deltas (diff_b).
    Returns the paths and the reference {(component, name): float64 ΔW} of each, and biases."""
    spec = TINY[arch]
    refs, paths, biases = [], [], {}
    only_b = None
    for which, seed in (("a", 40), ("b", 41)):
        parts, ref = [], {}
        for component, (scheme, prefix, style, flat) in spec[which].items():
            shapes = {n: s for n, s in tv.shapes_of(getattr(pipe, component)).items() if keep(component, n)}
            if only_b is None:  # a module of block 1 that is not part of a fused one
                only_b = (component, sorted(n for n in shapes if ".1." in n and not scheme.encode(n)[0].fused)[0])
            if which == "a":
                shapes = {n: s for n, s in shapes.items() if (component, n) != only_b}
                rank, alpha, dtype = per_module((2, 4)), per_module((1.0, 2.0, 8.0), 1), torch.float16
            else:
                shapes = {n: s for n, s in shapes.items() if ".0." in n or (component, n) == only_b}
                rank, alpha, dtype = per_module((3, 1), 2), per_module((3.0, 0.5), 3), torch.float32
            # a fused target has one alpha: key the per-module values by the file's name
            modules = tv.file_modules(shapes, scheme, rank, alpha, seed)
            path = tmp_path / f"{which}_{component}.safetensors"
            stored = tv.write(path, modules, prefix, style=style, flat=flat, dtype=dtype,
                              metadata={"modelspec.architecture": HEADERS[arch]})
            parts.append(path)
            ref.update({(component, n): d for n, d in tv.deltas(stored, shapes).items()})
        path = tmp_path / f"{which}.safetensors"
        tv.combine(path, *parts)
        if arch == "wan" and which == "a":  # bias deltas, as ComfyUI-world files carry them
            with safe_open(str(path), "pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
            for i, name in enumerate(("blocks.0.attn1.to_q", "proj_out")):
                biases[("transformer", name)] = torch.randn(pipe.transformer.get_submodule(name).out_features,
                                                            generator=torch.Generator().manual_seed(i)).half()
                sd[f"diffusion_model.{WAN.encode(name)[0].name}.diff_b"] = biases[("transformer", name)]
            save_file(sd, str(path), metadata={"modelspec.architecture": HEADERS[arch]})
        refs.append(ref)
        paths.append(path)
    return paths, refs, biases


def expected_linear(refs, weights=WEIGHTS):
    out = {}
    for ref, w in zip(refs, weights):
        for key, delta in ref.items():
            out[key] = out.get(key, 0) + w * delta
    return out


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def snapshot(pipe, components):
    return {(c, n): (m.weight.detach().double().clone(), None if m.bias is None else m.bias.detach().double().clone())
            for c in components for n, m in tv.linears(getattr(pipe, c)).items()}


def assert_fused(pipe, base, expected, biases=None, tol=1e-5):
    """Every weight = base + expected ΔW (float64 reference); untouched weights unchanged."""
    biases = biases or {}
    for (component, name), (w0, b0) in base.items():
        layer = tv.weight_of(getattr(pipe, component), name)
        got = layer.weight.detach().double()
        if (component, name) in expected:
            delta = expected[(component, name)]
            assert rel(got - w0, delta) < tol, (component, name, rel(got - w0, delta))
        else:
            assert torch.equal(got, w0), (component, name)
        if (component, name) in biases:
            assert torch.allclose(layer.bias.detach().double() - b0, biases[(component, name)], rtol=0, atol=1e-6)
        elif b0 is not None:
            assert torch.allclose(layer.bias.detach().double(), b0, rtol=0, atol=1e-7), (component, name)


def load_and_fuse(pipe, path, components):
    import tiny

    with tiny.capture_load_warnings() as messages:
        pipe.load_lora_weights(str(path), adapter_name="m")
    alarms = ("unexpected keys", "missing keys", "not loaded", "unsupported keys", "incompatible keys", "no lora keys")
    bad = [m for m in messages if any(a in m.lower() for a in alarms)]
    # a file with some bias deltas makes PEFT give every layer a lora_B bias (zeros where the
    # file has none) and report those as missing: the only report allowed
    bad = [m for m in bad if not (m.startswith("Loading adapter weights from state_dict led to missing keys")
                                  and all(k.strip().endswith("lora_B.m.bias") for k in m.split(":", 1)[1].rstrip(". ").split(",")))]
    assert not bad, bad
    pipe.fuse_lora(components=list(components), lora_scale=1.0, adapter_names=["m"])


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("out_format", ["default", "diffusers"])
def test_diffusers_loads_and_fuses_a_linear_merge(tmp_path, arch, out_format):
    """A ``linear`` merge of two inputs in different formats (ranks and alphas differing per
    module and per input, one fp16, a module only in the second) written by loramerge loads in
    the real pipeline class through ``load_lora_weights``, every key consumed, and after
    ``fuse_lora`` every weight equals base + Σ wᵢ ΔWᵢ computed here from the inputs' tensors.
    The default (ComfyUI-style) format is checked on the modules diffusers can load from it."""
    spec = TINY[arch]
    pipe = spec["pipe"]()
    components = list(spec["a"])
    import re

    keep = (lambda c, n: not re.search(spec["comfy_unloadable"], n)) if out_format == "default" else (lambda c, n: True)
    paths, refs, biases = tiny_inputs(tmp_path, arch, pipe, keep)
    merged = loramerge.merge(paths, weights=WEIGHTS, method="linear")
    assert merged.arch == arch and len(merged) == len(set(refs[0]) | set(refs[1]))
    written = loramerge.save(merged, tmp_path / "m.safetensors", format=None if out_format == "default" else out_format)
    assert written == ("comfyui" if out_format == "default" else "diffusers")
    base = snapshot(pipe, components)
    load_and_fuse(pipe, tmp_path / "m.safetensors", components)
    assert_fused(pipe, base, expected_linear(refs), {k: WEIGHTS[0] * b.double() for k, b in biases.items()})


@pytest.mark.parametrize("arch", list(TINY))
def test_diffusers_loads_and_fuses_an_svd_merge(tmp_path, arch):
    """An ``svd`` merge to rank 2: after diffusers fuses it, each weight moved by the best rank-2
    approximation (float64 SVD here) of Σ wᵢ ΔWᵢ."""
    spec = TINY[arch]
    pipe = spec["pipe"]()
    paths, refs, _ = tiny_inputs(tmp_path, arch, pipe)
    merged = loramerge.merge(paths, weights=WEIGHTS, method="svd", rank=2)
    loramerge.save(merged, tmp_path / "m.safetensors", format="diffusers")
    base = snapshot(pipe, list(spec["a"]))
    load_and_fuse(pipe, tmp_path / "m.safetensors", list(spec["a"]))
    expected = {k: truncated(d, 2) for k, d in expected_linear(refs).items()}
    assert_fused(pipe, {k: (w, None) for k, (w, _) in base.items()}, expected, tol=1e-4)


def test_wan22_experts_load_into_transformer_and_transformer_2(tmp_path):
    """Wan 2.2 A14B: a combined ai-toolkit file (both experts, fp16) merged with a high-noise
    musubi file. The diffusers-format result loads into ``transformer`` through
    ``load_lora_weights`` and into ``transformer_2`` through its ``load_lora_adapter(prefix=
    "transformer_2")``; both fuse to base + Σ wᵢ ΔWᵢ. The kohya format (one expert per file)
    refuses the low-noise part in one line; the ComfyUI-style file keeps it under
    ``diffusion_model.transformer_2.``, which diffusers' converter refuses (pinned)."""
    from diffusers import WanPipeline

    pipe = tv.pipeline("wan", tv.wan_transformer(seed=0), tv.wan_transformer(seed=1))
    shapes = {n: s for n, s in tv.shapes_of(pipe.transformer).items() if n != "patch_embedding"}
    high = tv.write(tmp_path / "hi.safetensors", tv.file_modules(shapes, WAN, per_module((2, 3)), None, 50), "diffusion_model.",
                    dtype=torch.float16)
    low = tv.write(tmp_path / "lo.safetensors", tv.file_modules(shapes, WAN, 2, None, 51), "diffusion_model.",
                   dtype=torch.float16)
    with safe_open(str(tmp_path / "hi.safetensors"), "pt") as f, safe_open(str(tmp_path / "lo.safetensors"), "pt") as g:
        combined = {k.replace("diffusion_model.", "diffusion_model.transformer_1."): f.get_tensor(k) for k in f.keys()}
        combined.update({k.replace("diffusion_model.", "diffusion_model.transformer_2."): g.get_tensor(k) for k in g.keys()})
    save_file(combined, str(tmp_path / "both.safetensors"))
    blocks = {n: s for n, s in shapes.items() if n.startswith("blocks.")}
    musubi = tv.write(tmp_path / "m.safetensors", tv.file_modules(blocks, WAN, 1, 4.0, 52), "lora_unet_", style="kohya",
                      flat=True)
    refs = [{**{("transformer", n): d for n, d in tv.deltas(high, shapes).items()},
             **{("transformer_2", n): d for n, d in tv.deltas(low, shapes).items()}},
            {("transformer", n): d for n, d in tv.deltas(musubi, blocks).items()}]
    merged = loramerge.merge([tmp_path / "both.safetensors", tmp_path / "m.safetensors"], weights=WEIGHTS)
    assert merged.components == ["transformer", "transformer_2"]
    loramerge.save(merged, tmp_path / "d.safetensors", format="diffusers")
    base = snapshot(pipe, ["transformer", "transformer_2"])
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="m")
    pipe.transformer_2.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer_2", adapter_name="m")
    pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0, adapter_names=["m"])
    assert_fused(pipe, {k: (w, None) for k, (w, _) in base.items()}, expected_linear(refs))

    with pytest.raises(LoraMergeError, match="transformer_2") as err:
        loramerge.save(merged, tmp_path / "k.safetensors", format="kohya")
    assert len(str(err.value).splitlines()) == 1
    loramerge.save(merged, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert any(k.startswith("diffusion_model.transformer_2.blocks.") for k in f.keys())
        assert any(k.startswith("diffusion_model.blocks.") for k in f.keys())
    back = loramerge.load(tmp_path / "c.safetensors")
    assert set(back.modules) == set(merged.modules)
    with pytest.raises(ValueError):
        WanPipeline.lora_state_dict(str(tmp_path / "c.safetensors"))


# ============================================================================================
# per-block weights, convert, fuse, attach, extract, inspect / analyze (tiny models)


@pytest.mark.parametrize("arch, spec, bad", [
    ("wan", {"transformer": {"block": {"1": 0.5}}}, {"transformer": {"block": {"40": 1}}}),
    ("hunyuanvideo", {"transformer": {"double": {"0": 0.0}, "single": [1, 0.25], "refiner": 2.0}},
     {"transformer": {"single": {"38-40": 1}}}),
    ("ltx2", {"transformer": {"block": {"0-1": 0.5}}, "connectors": 0.0}, {"transformer": {"block": [1] * 49}}),
    ("ltx-video", {"transformer": {"block": {"1": -1.0}}}, {"transformer": {"double": 1}}),
])
def test_block_weights_name_real_blocks(tmp_path, arch, spec, bad):
    """Block weights address the denoiser's real blocks by kind (Wan ``block``, HunyuanVideo
    ``double``/``single``/``refiner``, LTX ``block``) and refuse indices past the full-size model."""
    from loramerge.blocks import block_id, parse_block_weights

    pipe = TINY[arch]["pipe"]()
    paths, refs, _ = tiny_inputs(tmp_path, arch, pipe)
    lora = loramerge.load(paths[0])
    weights = parse_block_weights(spec, arch)
    merged = loramerge.merge([lora], block_weights=spec)
    factors = {key: weights.weight_for(lora[key]) for key in lora.modules}
    assert set(factors.values()) - {1.0}  # the spec reached some modules
    for key, module in merged.modules.items():
        want = factors[key] * lora[key].delta(torch.float64)
        assert torch.allclose(module.delta(torch.float64), want, rtol=0, atol=1e-5), key
    ids = {block_id(arch, m) for m in lora}
    assert {"wan": "block.1", "hunyuanvideo": "refiner.0", "ltx2": "block.0", "ltx-video": "block.1"}[arch] in ids
    with pytest.raises(UsageError) as err:
        parse_block_weights(bad, arch)
    assert len(str(err.value).splitlines()) == 1


def test_block_weights_of_the_second_wan22_expert(tmp_path):
    """Wan 2.2's ``transformer_2`` has its own block ids: weights given for it leave the
    high-noise expert alone."""
    from loramerge.blocks import parse_block_weights

    shapes = {n: s for n, s in tv.shapes_of(tv.wan_transformer()).items() if n.startswith("blocks.")}
    for name, prefix in (("hi", "diffusion_model.transformer_1."), ("lo", "diffusion_model.transformer_2.")):
        tv.write(tmp_path / f"{name}.safetensors", tv.file_modules(shapes, WAN, 2, None, 60), prefix,
                 metadata={"modelspec.architecture": "wan2.2/lora"})
    tv.combine(tmp_path / "both.safetensors", tmp_path / "hi.safetensors", tmp_path / "lo.safetensors")
    lora = loramerge.load(tmp_path / "both.safetensors")
    weights = parse_block_weights({"transformer_2": {"block": {"1": 0.0}}}, "wan")
    for module in lora:
        expected = 0.0 if module.component == "transformer_2" and module.name.startswith("blocks.1.") else 1.0
        assert weights.weight_for(module) == expected, module.key


@pytest.mark.parametrize("arch", list(TINY))
def test_convert_round_trips_between_every_written_format(tmp_path, arch):
    """Every ordered pair of the formats the architecture writes: ΔW (and bias deltas) unchanged,
    the same modules, the architecture detected again from each file."""
    from loramerge.formats import archs

    pipe = TINY[arch]["pipe"]()
    paths, _, _ = tiny_inputs(tmp_path, arch, pipe)
    source = loramerge.load(paths[0])
    formats = list(archs.spec(arch).formats)
    assert "comfyui" in formats and archs.spec(arch).default_format == "comfyui"
    for first in formats:
        for second in formats:
            components = set(archs.spec(arch).formats[first]) & set(archs.spec(arch).formats[second])
            lora = loramerge.LoRA([m for m in source if m.component in components], arch)
            loramerge.save(lora, tmp_path / "1.safetensors", format=first)
            one = loramerge.load(tmp_path / "1.safetensors")
            assert one.arch == arch and one.format == ("comfyui" if first == "comfyui" else first)
            loramerge.save(one, tmp_path / "2.safetensors", format=second)
            two = loramerge.load(tmp_path / "2.safetensors")
            assert two.arch == arch and set(two.modules) == set(lora.modules), (first, second)
            for key, module in lora.modules.items():
                assert rel(two[key].delta(torch.float64), module.delta(torch.float64)) < 1e-6, (first, second, key)
                if module.bias is not None:
                    assert torch.allclose(two[key].bias_delta(), module.bias_delta(), rtol=0, atol=1e-6)


SINGLE = {  # prefix, scheme and diffusers' single-file converter of each architecture
    "wan": ("model.diffusion_model.", WAN, "convert_wan_transformer_to_diffusers"),
    "hunyuanvideo": ("", HUNYUAN, "convert_hunyuan_video_transformer_to_diffusers"),
    "ltx2": ("model.diffusion_model.", LTX, "convert_ltx2_transformer_to_diffusers"),
    "ltx-video": ("model.diffusion_model.", LTX, "convert_ltx_transformer_checkpoint_to_diffusers"),
}


def single_file(arch, model) -> dict[str, torch.Tensor]:
    """The transformer as a ComfyUI-style single file, checked against diffusers' converter
    (HunyuanVideo's ``linear1`` aside: diffusers splits it at the full-size 3072)."""
    from diffusers.loaders import single_file_utils

    prefix, scheme, converter = SINGLE[arch]
    sd = tv.original_state(model, scheme, prefix)
    back = getattr(single_file_utils, converter)({k: v for k, v in sd.items() if ".linear1." not in k})
    state = model.state_dict()
    params = {f"{n}.{p}" for n, m in tv.linears(model).items() for p in ("weight", "bias") if getattr(m, p) is not None}
    linear1 = r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\."
    import re

    assert set(back) == {p for p in params if not re.match(linear1, p)}
    assert all(torch.equal(back[k], state[k]) for k in back)
    return sd


@pytest.mark.parametrize("arch", list(TINY))
def test_fuse_into_a_diffusers_folder_and_a_single_file(tmp_path, arch):
    """``fuse`` of the two tiny inputs into the tiny pipeline saved with save_pretrained, and into
    its ComfyUI-style single file: every weight (and Wan's biases) = base + Σ wᵢ ΔWᵢ."""
    from loramerge.fuse import fuse

    spec = TINY[arch]
    pipe = spec["pipe"]()
    components = list(spec["a"])
    paths, refs, biases = tiny_inputs(tmp_path, arch, pipe)
    expected = expected_linear(refs)
    bias_expected = {k: WEIGHTS[0] * b.double() for k, b in biases.items()}
    folder = tmp_path / "base"
    for component in components:
        getattr(pipe, component).save_pretrained(folder / component)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": type(pipe).__name__}))
    fuse(folder, paths, tmp_path / "fused", weights=WEIGHTS)
    base = snapshot(pipe, components)
    for component in components:
        model = getattr(pipe, component)
        model.load_state_dict(type(model).from_pretrained(tmp_path / "fused" / component).state_dict())
    assert_fused(pipe, base, expected, bias_expected)

    pipe = spec["pipe"]()
    sd = single_file(arch, pipe.transformer)
    save_file(sd, str(tmp_path / "base.safetensors"))
    only_transformer = [tmp_path / "a_t.safetensors", tmp_path / "b_t.safetensors"]
    for path, out in zip(paths, only_transformer):
        lora = loramerge.load(path)
        loramerge.save(loramerge.LoRA([m for m in lora if m.component == "transformer"], arch), out)
    fuse(tmp_path / "base.safetensors", only_transformer, tmp_path / "fused.safetensors", weights=WEIGHTS)
    with torch.no_grad():
        for (component, name), delta in expected.items():
            if component == "transformer":
                layer = tv.weight_of(pipe.transformer, name)
                layer.weight += delta.to(layer.weight.dtype)
                if (component, name) in bias_expected:
                    layer.bias += bias_expected[(component, name)].float()
    want = tv.original_state(pipe.transformer, SINGLE[arch][1], SINGLE[arch][0])
    with safe_open(str(tmp_path / "fused.safetensors"), "pt") as f:
        assert set(f.keys()) == set(want)
        for key, tensor in want.items():
            assert torch.allclose(f.get_tensor(key), tensor, rtol=0, atol=2e-6), key


@pytest.mark.parametrize("arch", list(TINY))
def test_attach_mixes_on_the_real_pipeline_object(tmp_path, arch):
    """``attach`` on the real pipeline class: the mix fuses to base + Σ wᵢ ΔWᵢ (biases too),
    block weights re-patch it, and unfuse gives back the original bits."""
    spec = TINY[arch]
    pipe = spec["pipe"]()
    components = list(spec["a"])
    paths, refs, biases = tiny_inputs(tmp_path, arch, pipe)
    base = snapshot(pipe, components)
    bits = {k: tv.weight_of(getattr(pipe, k[0]), k[1]).weight.detach().clone() for k in base}
    mix = loramerge.attach(pipe, {"a": paths[0], "b": paths[1]})
    mix.set_weights({"a": WEIGHTS[0], "b": WEIGHTS[1]})
    mix.fuse()
    assert_fused(pipe, base, expected_linear(refs), {k: WEIGHTS[0] * b.double() for k, b in biases.items()})
    grammar = loramerge.formats.archs.spec(arch).blocks
    kind = next(iter(grammar.kinds))
    mix.set_weights({"a": WEIGHTS[0], "b": WEIGHTS[1]}, block_weights={"transformer": {kind: {"0": 0.0}}})
    zeroed = {k: d for k, d in expected_linear(refs).items()
              if not (k[0] == "transformer" and grammar.block_of(k[1]) == f"{kind}.0")}
    assert len(zeroed) < len(expected_linear(refs))
    assert_fused(pipe, {k: (w, None) for k, (w, _) in base.items()}, zeroed)
    mix.unfuse()
    for key, original in bits.items():
        assert torch.equal(tv.weight_of(getattr(pipe, key[0]), key[1]).weight, original), key


@pytest.mark.parametrize("arch", list(TINY))
def test_extract_from_two_single_files(tmp_path, arch):
    """``extract`` from a tiny base single file and a tuned one (base + rank-2 changes on some
    modules, fused tensors included): each changed module comes back at rank 2, exactly."""
    from loramerge.extract import extract

    pipe = TINY[arch]["pipe"]()
    base = single_file(arch, pipe.transformer)
    save_file(base, str(tmp_path / "base.safetensors"))
    gen = torch.Generator().manual_seed(70)
    changed = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(sorted(tv.linears(pipe.transformer).items())):
            if i % 3 == 0:
                out_f, in_f = layer.weight.shape[0], layer.weight[0].numel()
                delta = (torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen) * 0.01)
                layer.weight += delta.reshape(layer.weight.shape)
                changed[name] = delta.double()
    save_file(single_file(arch, pipe.transformer), str(tmp_path / "tuned.safetensors"))
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=2)
    assert lora.arch == arch and set(lora.modules) == {f"transformer.{n}" for n in changed}
    for name, delta in changed.items():
        got = lora[f"transformer.{name}"].delta(torch.float64).reshape(delta.shape)
        assert rel(got, delta) < 1e-4, name
    loramerge.save(lora, tmp_path / "x.safetensors")
    assert loramerge.load(tmp_path / "x.safetensors").arch == arch


def test_inspect_and_analyze_run(tmp_path):
    """``loramerge inspect`` names the architecture, the format and the undetermined variant
    (full-size 14B blocks); ``analyze`` reports Wan's blocks (tiny widths: it works on dense ΔW)."""
    from typer.testing import CliRunner

    from loramerge.cli import app

    shapes = wan_shapes("wan2.1-t2v-14b", blocks=(0, 39))
    tv.write(tmp_path / "a.safetensors", tv.file_modules(shapes, WAN, 1, None, 80), "diffusion_model.")
    tiny = {n: s for n, s in tv.shapes_of(tv.wan_transformer()).items() if n.startswith("blocks.")}
    tv.write(tmp_path / "c.safetensors", tv.file_modules(tiny, WAN, 2, None, 80), "diffusion_model.")
    tv.write(tmp_path / "d.safetensors", tv.file_modules(tiny, WAN, 3, 1.0, 81), "lora_unet_", style="kohya", flat=True)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    assert "wan (Wan 2.1 / 2.2)" in result.output and "comfyui" in result.output
    assert "undetermined (" in result.output and "wan2.2-t2v-a14b" in result.output
    assert "transformer.blocks.39" in result.output
    result = runner.invoke(app, ["analyze", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors"),
                                 "--out", str(tmp_path / "an")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert any("blocks.1" in name for name in report["blocks"])


def test_a_header_naming_the_variant_settles_it(tmp_path):
    """Shapes leave Wan 2.1 T2V-14B / I2V / FLF2V / either 2.2 expert open; a header naming one
    of them (``loramerge.variant``, or ``modelspec.architecture`` ``<variant>/lora``) settles it,
    one naming a variant the shapes exclude does not, and loramerge writes a determined variant."""
    shapes = wan_shapes("wan2.1-t2v-14b", blocks=(0,))
    modules = tv.file_modules(shapes, WAN, 1, None, 90)
    for header, variant in (({"loramerge.variant": "wan2.2-t2v-a14b"}, "wan2.2-t2v-a14b"),
                            ({"modelspec.architecture": "wan2.1-i2v-14b-720p/lora"}, "wan2.1-i2v-14b-720p"),
                            ({"modelspec.architecture": "wan2.1/lora"}, None),
                            ({"loramerge.variant": "wan2.1-t2v-1.3b"}, None)):  # 1.3B: the shapes say no
        tv.write(tmp_path / "a.safetensors", modules, "diffusion_model.", metadata=header)
        lora = loramerge.load(tmp_path / "a.safetensors")
        assert lora.variant == variant, header
    small = tv.write(tmp_path / "s.safetensors", tv.file_modules(wan_shapes("wan2.1-t2v-1.3b", blocks=(0,)), WAN, 1, None, 91),
                     "lora_unet_", style="kohya", flat=True)
    assert small and loramerge.load(tmp_path / "s.safetensors").variant == "wan2.1-t2v-1.3b"
    loramerge.save(loramerge.load(tmp_path / "s.safetensors"), tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata()["loramerge.variant"] == "wan2.1-t2v-1.3b"
