"""Qwen-Image, Z-Image and Lumina 2 against diffusers 0.42 itself.

Every layout a trainer writes is read from a full-size synthetic file (rank 1, every Linear of
the real transformer, enumerated on the meta device) into the module set diffusers' own
converter produces — or, where diffusers is wrong, the test pins what diffusers does and checks
loramerge against the file's tensors. Merges written in every output format are loaded into
tiny transformers of the real classes with diffusers' loader and fused; the weights must equal
base + Σ wᵢΔWᵢ computed here in float64 from the input tensors. Detection, variants,
ambiguity, per-block weights, conversions, fusing, live mixing, extraction, inspect/analyze.
"""

import functools
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
import loramerge
import tiny
import tiny_qwen as tq
from loramerge.errors import AmbiguousArchitectureError, LoraMergeError, UnsupportedModuleError, UsageError

W = (0.7, -0.4)
ALARMS = ("unexpected keys", "missing keys", "not loaded", "unsupported keys", "incompatible keys", "did not match")


@functools.cache
def meta(variant: str) -> dict:
    return tq.meta_modules(variant)


def blocks_only(modules: dict) -> dict:
    return {n: s for n, s in modules.items() if re.match(r"(layers|noise_refiner|context_refiner|transformer_blocks)\.", n)}


def their_modules(arch: str, path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers' own conversion of a file: {module: (lora_B, lora_A)} (alpha baked in)."""
    sd = getattr(diffusers, tq.PIPELINES[arch]).lora_state_dict(str(path))
    return {k[len("transformer."):-len(".lora_A.weight")]: (sd[k.replace("lora_A", "lora_B")], sd[k])
            for k in sd if k.endswith(".lora_A.weight")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def probe(cols: int) -> torch.Tensor:
    return torch.randn(cols, 2, generator=torch.Generator().manual_seed(cols), dtype=torch.float64)


def assert_same_on_probes(ours: dict, expected: tq.Deltas, names, tol=1e-6) -> None:
    """ours[name] = (up, down, scale); ΔW·x equal to the file's for random x, module by module."""
    for name in names:
        up, down, scale = ours[name]
        x = probe(down.shape[1])
        err = rel(scale * (up.double() @ (down.double() @ x)), expected.apply(name, x))
        assert err < tol, f"{name}: relative error {err:.1e}"


# --------------------------------------------------------------------------------------------
# full-size tables


@pytest.mark.parametrize("variant, params", [
    ("qwen-image", 20_430_401_088), ("qwen-image-layered", 20_430_407_232),
    ("z-image-turbo", 6_154_908_736), ("z-image-omni", 6_513_266_880), ("lumina2", 2_609_769_152),
])
def test_configs_build_the_released_models_and_tables_match(variant, params):
    """The configs give the parameter counts the notes verified for the releases, and the key
    tables loramerge ships equal the meta models' Linears."""
    from loramerge.formats import keymaps

    model = keymaps.build_model(keymaps.configs()[variant]["transformer"], "meta")
    assert sum(p.numel() for p in model.parameters()) == params
    assert keymaps.table(variant)["transformer"] == {k: tuple(v) for k, v in keymaps.module_shapes(model).items()}
    if variant.startswith("qwen"):  # every Qwen-Image variant has the same modules
        for other in ("qwen-image-edit", "qwen-image-edit-2509", "qwen-image-edit-2511", "qwen-image-2512"):
            assert keymaps.table(other) == keymaps.table(variant)


def test_original_names_agree_with_diffusers_single_file_converters():
    """The original names these tests write (tiny_qwen) are what diffusers' single-file
    converters turn into the diffusers names: full-size state dicts on the meta device."""
    from diffusers.loaders.single_file_utils import (
        convert_lumina2_to_diffusers, convert_z_image_transformer_checkpoint_to_diffusers,
    )

    for arch, variant, convert in (("zimage", "z-image-turbo", convert_z_image_transformer_checkpoint_to_diffusers),
                                   ("lumina2", "lumina2", convert_lumina2_to_diffusers)):
        from loramerge.formats import keymaps

        model = keymaps.build_model(keymaps.configs()[variant]["transformer"], "meta")
        single = tq.comfy_single_file(arch, model, prefix="")
        back = convert(dict(single))
        linear = tq.linears(model)
        assert {k: tuple(v.shape) for k, v in back.items() if k.endswith(".weight") and k[:-7] in linear} == {
            n + ".weight": s for n, s in linear.items()}
    # pinned: diffusers' Lumina 2 converter renames model.diffusion_model. keys, then pops the old names
    with pytest.raises(KeyError, match="model.diffusion_model"):
        convert_lumina2_to_diffusers(tq.comfy_single_file("lumina2", model))


# --------------------------------------------------------------------------------------------
# every layout, full size, against diffusers' converter


def _zimage_comfy_kohya(name):  # diffusers 0.42 renames kohya x_embedder/final_layer to no module
    original, _ = tq.zimage_original(name)
    return original.replace("x_embedder", "x.embedder").replace("final_layer.", "final.layer.") \
        if original.startswith(("x_embedder", "final_layer")) else name


def _unconverted_qkv(name):  # diffusers 0.42 leaves diffusion-pipe's attention.qkv / .out as they are
    original, _ = tq.zimage_original(name)
    return original if original.endswith((".qkv", ".out")) else name


def _double_prefix(name):  # OneTrainer LEGACY: diffusers keeps transformer. and adds another
    return "transformer." + name


DIFFUSERS_WRONG = {
    ("qwen_image", "onetrainer-legacy"): _double_prefix,
    ("zimage", "onetrainer-legacy"): _double_prefix,
    ("zimage", "musubi-comfy"): _zimage_comfy_kohya,
    ("zimage", "diffusion-pipe"): _unconverted_qkv,
    ("lumina2", "sd-scripts"): lambda name: None,  # not converted at all: nothing reaches the model
}
BLOCKS_ONLY = {("zimage", "diffusion-pipe"), ("lumina2", "diffusion-pipe")}  # what diffusion-pipe trains
CASES = [(arch, layout) for arch in tq.ARCHS for layout in tq.LAYOUTS[arch]]


@pytest.mark.parametrize("arch, layout", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_fullsize_layout_reads_as_diffusers_converts_it(tmp_path, arch, layout):
    modules = meta(tq.FULL_SIZE[arch])
    if (arch, layout) in BLOCKS_ONLY:
        modules = blocks_only(modules)
    path = tmp_path / "in.safetensors"
    expected = tq.make_file(path, arch, layout, modules, seed=1, ranks=(1,))

    lora = loramerge.load(path)  # no --arch, no header: keys and shapes alone
    assert lora.arch == arch
    assert {m.name for m in lora} == set(modules) == set(expected)
    assert {m.name: m.shape for m in lora} == modules
    assert_same_on_probes({m.name: (*m.factors(), m.scale) for m in lora}, expected, modules)

    theirs = their_modules(arch, path)
    wrong = DIFFUSERS_WRONG.get((arch, layout))
    if wrong is None:
        assert set(theirs) == set(modules)
        assert_same_on_probes({n: (b, a, 1.0) for n, (b, a) in theirs.items()}, expected, modules, tol=1e-5)
    else:  # pinned: what diffusers 0.42 makes of it (fails once diffusers fixes it)
        assert set(theirs) == {wrong(n) for n in modules} - {None}
        right = [n for n in modules if wrong(n) == n]
        assert_same_on_probes({n: (*theirs[n], 1.0) for n in right}, expected, right, tol=1e-5)


def test_fullsize_zimage_omni_kohya_siglip_names(tmp_path):
    """musubi-style kohya names of Z-Image Omni's siglip refiner: read here (variant Omni, by
    shapes); diffusers 0.42 over-splits them (its fix-up list lacks siglip_refiner)."""
    modules = meta("z-image-omni")
    path = tmp_path / "omni.safetensors"
    tq.make_file(path, "zimage", "musubi", modules, seed=2, ranks=(1,), dtype=torch.float16)
    lora = loramerge.load(path)
    assert lora.arch == "zimage" and lora.variant == "z-image-omni"
    assert {m.name for m in lora} == set(modules)
    theirs = their_modules("zimage", path)
    siglip = {n for n in modules if n.startswith("siglip_refiner.")}
    assert siglip and not siglip & set(theirs)
    assert "siglip.refiner.0.attention.to_q" in theirs


@pytest.mark.parametrize("arch, prefix, flat", [("qwen_image", "lycoris_", True), ("qwen_image", "diffusion_model.", False),
                                                ("zimage", "diffusion_model.", False), ("zimage", "lycoris_", True)])
def test_lokr(tmp_path, arch, prefix, flat):
    """LyCORIS LoKr (SimpleTuner lycoris_, ai-toolkit diffusion_model.): ΔW = alpha/r·kron(w1, w2)
    exactly. diffusers reads only ai-toolkit's Z-Image LoKr; the Qwen ones make it raise."""
    model = tq.transformer(arch)
    modules = {n: s for n, s in tq.linears(model).items() if s[0] % 2 == 0 and s[1] % 2 == 0}
    expected = tq.write_lokr(tmp_path / "k.safetensors", prefix, flat, modules, seed=3)
    lora = loramerge.load(tmp_path / "k.safetensors")
    assert (lora.arch, lora.format) == (arch, "lycoris") and {m.name for m in lora} == set(modules)
    for m in lora:
        assert rel(m.delta(torch.float64), expected[m.name]()) < 1e-6, m.name
    loader = getattr(diffusers, tq.PIPELINES[arch])
    if arch == "qwen_image":
        with pytest.raises(ValueError):
            loader.lora_state_dict(str(tmp_path / "k.safetensors"))
    elif prefix == "diffusion_model.":
        sd = loader.lora_state_dict(str(tmp_path / "k.safetensors"))
        for name in modules:
            key = f"transformer.{name}."
            theirs = torch.kron(sd[key + "lokr_w1"].double(), sd[key + "lokr_w2_a"].double() @ sd[key + "lokr_w2_b"].double())
            assert rel(theirs, expected[name]()) < 1e-6, name
    else:  # lycoris_ keys are passed on unconverted: they name no module of the model
        sd = loader.lora_state_dict(str(tmp_path / "k.safetensors"))
        assert all(k.startswith("transformer.lycoris_") for k in sd)


# --------------------------------------------------------------------------------------------
# merges written in every format, loaded by diffusers into tiny transformers

INPUTS = {  # two inputs in different layouts: (layout of A, layout of B)
    "qwen_image": ("musubi", "ai-toolkit"),
    "zimage": ("diffusion-pipe", "musubi"),
    "lumina2": ("sd-scripts", "ai-toolkit"),
}


def make_inputs(tmp_path, arch, model):
    """A: fp16, per-module ranks and alphas; B: fp32, other ranks, every third module missing
    (and, for diffusion-pipe, only block modules) — so some modules exist in one input only."""
    modules = tq.linears(model)
    la, lb = INPUTS[arch]
    a_modules = blocks_only(modules) if (arch, la) in BLOCKS_ONLY else modules
    b_modules = {n: s for i, (n, s) in enumerate(sorted(modules.items())) if i % 3 or n not in a_modules}
    da = tq.make_file(tmp_path / "a.safetensors", arch, la, a_modules, seed=1, dtype=torch.float16)
    db = tq.make_file(tmp_path / "b.safetensors", arch, lb, b_modules, seed=2, ranks=(2, 3, 1), alphas=(2.0, 0.25, 6.0))
    assert set(da) | set(db) == set(modules) and set(da) ^ set(db)
    return da, db


def load_and_fuse(arch, model, path, expected_modules):
    pipe = tq.pipeline(arch, model)
    with tiny.capture_load_warnings() as messages:
        pipe.load_lora_weights(str(path), adapter_name="m")
    assert not [m for m in messages if any(a in m.lower() for a in ALARMS)], messages
    assert set(tiny.lora_layers(model, "m")) == set(expected_modules)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["m"])


def check_weights(model, base, expected: dict, tol=1e-5):
    for name, w0 in base.items():
        got = model.get_submodule(name).weight.detach().double()
        if name not in expected:
            assert torch.equal(got, w0.double()), f"{name} changed"
            continue
        err = float((got - w0.double() - expected[name]).norm() / expected[name].norm())
        assert err < tol, f"{name}: relative error {err:.2e}"


def linear_sum(deltas, names):
    return {n: sum(w * d[n] for w, d in zip(W, deltas) if n in d) for n in names}


# which modules diffusers 0.42 loads from each written format (None: all of them)
DIFFUSERS_LOADS = {
    ("zimage", "kohya"): lambda n: not n.startswith(("all_x_embedder", "all_final_layer")),  # renamed to nothing
    ("lumina2", "kohya"): lambda n: False,  # lora_unet_ not converted: "No LoRA keys … found"
}


@pytest.mark.parametrize("arch", tq.ARCHS)
@pytest.mark.parametrize("out_format", ["kohya", "comfyui", "diffusers"])
def test_linear_merge_loads_in_diffusers(tmp_path, arch, out_format):
    model = tq.transformer(arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in tq.linears(model)}
    da, db = make_inputs(tmp_path, arch, model)
    merged = loramerge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], weights=W)
    assert merged.arch == arch and len(merged) == len(base)
    loramerge.save(merged, tmp_path / "m.safetensors", format=out_format, dtype="fp32")
    assert loramerge.load(tmp_path / "m.safetensors").format == out_format
    if arch == "lumina2" and out_format == "comfyui":
        # diffusers splits diffusion_model. qkv at Lumina 2's real sizes (2304, 768, 768) only;
        # test_lumina2_comfyui_loads_in_diffusers_at_full_width runs it at that width
        with pytest.raises(RuntimeError, match="split_with_sizes"):
            tq.pipeline(arch, model).load_lora_weights(str(tmp_path / "m.safetensors"))
        return
    loads = DIFFUSERS_LOADS.get((arch, out_format), lambda n: True)
    expected = {n: d for n, d in linear_sum((da, db), base).items() if loads(n)}
    pipe = tq.pipeline(arch, model)
    with tiny.capture_load_warnings() as messages:
        pipe.load_lora_weights(str(tmp_path / "m.safetensors"), adapter_name="m")
    if len(expected) < len(base):  # pinned diffusers losses: they warn, and those modules stay put
        assert any(a in m.lower() for m in messages for a in ("unexpected keys", "no lora keys")), messages
    else:
        assert not [m for m in messages if any(a in m.lower() for a in ALARMS)], messages
    assert set(tiny.lora_layers(model, "m")) == set(expected)
    if expected:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["m"])
    check_weights(model, base, expected)


def test_lumina2_comfyui_loads_in_diffusers_at_full_width(tmp_path):
    """The default Lumina 2 format (diffusion-pipe's layout) through diffusers' converter, at
    the real attention width: a merge of two block LoRAs (every block module in the union)."""
    model = tq.transformer("lumina2", wide=True)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in blocks_only(tq.linears(model))}
    da = tq.make_file(tmp_path / "a.safetensors", "lumina2", "diffusion-pipe", {n: tuple(w.shape) for n, w in base.items()},
                      seed=4, dtype=torch.float16)
    part = {n: tuple(w.shape) for i, (n, w) in enumerate(sorted(base.items())) if i % 2}
    db = tq.make_file(tmp_path / "b.safetensors", "lumina2", "ai-toolkit", part, seed=5, ranks=(3, 1))
    merged = loramerge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], weights=W)
    assert loramerge.save(merged, tmp_path / "m.safetensors") == "comfyui"  # the default
    load_and_fuse("lumina2", model, tmp_path / "m.safetensors", base)
    check_weights(model, base, linear_sum((da, db), base))


@pytest.mark.parametrize("arch", tq.ARCHS)
def test_svd_merge_loads_in_diffusers(tmp_path, arch):
    """svd at rank 2: the best rank-2 approximation of Σ wᵢΔWᵢ per module (float64 SVD here),
    written in the default format (diffusers for Lumina 2, see above)."""
    model = tq.transformer(arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in tq.linears(model)}
    da, db = make_inputs(tmp_path, arch, model)
    merged = loramerge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], weights=W, method="svd", rank=2)
    out_format = "diffusers" if arch == "lumina2" else None
    loramerge.save(merged, tmp_path / "m.safetensors", format=out_format, dtype="fp32")
    expected = {}
    for name, total in linear_sum((da, db), base).items():
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        expected[name] = (u[:, :2] * s[:2]) @ vh[:2]
    load_and_fuse(arch, model, tmp_path / "m.safetensors", base)
    check_weights(model, base, expected, tol=1e-4)


# --------------------------------------------------------------------------------------------
# detection, variants, ambiguity, refusals


def test_qwen_variant_is_undetermined_unless_the_header_names_it(tmp_path):
    modules = {n: s for n, s in meta("qwen-image").items() if n.endswith(("img_mod.1", "txt_mlp.net.2"))}
    assert len(modules) == 120  # every block, so Qwen-Image alone places them
    path = tmp_path / "q.safetensors"
    tq.make_file(path, "qwen_image", "musubi", modules, seed=1, ranks=(1,), dtype=torch.float16)
    lora = loramerge.load(path)
    assert (lora.arch, lora.variant) == ("qwen_image", None)
    for header, variant in [({"modelspec.architecture": "Qwen-Image-Edit-Plus/lora"}, "qwen-image-edit-2509"),
                            ({"modelspec.architecture": "Qwen-Image-Edit-2511/lora"}, "qwen-image-edit-2511"),
                            ({"modelspec.architecture": "Qwen-Image-Layered/lora"}, "qwen-image-layered"),
                            ({"modelspec.architecture": "Qwen-Image/lora"}, None),  # OneTrainer: any variant
                            ({"ss_base_model_version": "qwen_image"}, None)]:  # ai-toolkit: any variant
        tq.make_file(path, "qwen_image", "musubi", modules, seed=1, ranks=(1,), dtype=torch.float16, metadata=header)
        lora = loramerge.load(path)
        assert (lora.arch, lora.variant) == ("qwen_image", variant), header
    # the variant survives convert and merge, written where musubi writes it
    edit = tmp_path / "edit.safetensors"
    tq.make_file(edit, "qwen_image", "ai-toolkit", modules, seed=2, ranks=(1,),
                 metadata={"modelspec.architecture": "Qwen-Image-Edit/lora"})
    merged = loramerge.merge([edit, path])
    assert merged.variant == "qwen-image-edit"
    loramerge.save(merged, tmp_path / "out.safetensors", format="kohya")
    back = loramerge.load(tmp_path / "out.safetensors")
    assert back.variant == "qwen-image-edit" and back.metadata["modelspec.architecture"] == "Qwen-Image-Edit/lora"


def test_zimage_and_lumina2_are_told_apart_by_shapes_else_by_the_header(tmp_path):
    """Original names shared by both NextDiTs (attention.qkv/out, feed_forward.w1-3): full-size
    shapes decide; shapes of neither are ambiguous until the header speaks."""
    shared = re.compile(r"layers\.\d+\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])$")
    lumina_shared = re.compile(r"layers\.\d+\.(attn\.to_[qkv]|attn\.to_out\.0|feed_forward\.linear_[123])$")
    z = {n: s for n, s in meta("z-image-turbo").items() if shared.match(n) and int(n.split(".")[1]) < 4}
    lu = {n: s for n, s in meta("lumina2").items() if lumina_shared.match(n) and int(n.split(".")[1]) < 4}
    tq.make_file(tmp_path / "z.safetensors", "zimage", "diffusion-pipe", z, seed=1, ranks=(1,))
    tq.make_file(tmp_path / "l.safetensors", "lumina2", "diffusion-pipe", lu, seed=1, ranks=(1,))
    assert loramerge.load(tmp_path / "z.safetensors").arch == "zimage"
    assert loramerge.load(tmp_path / "l.safetensors").arch == "lumina2"

    model = tq.transformer("lumina2")  # tiny: shapes of neither (only the 3:1:1 qkv rows fit Lumina alone)
    small = {n: s for n, s in tq.linears(model).items() if lumina_shared.match(n)}
    tq.make_file(tmp_path / "qkv.safetensors", "lumina2", "diffusion-pipe", small, seed=2)
    assert loramerge.load(tmp_path / "qkv.safetensors").arch == "lumina2"  # 80 rows: not thirds
    small = {n: s for n, s in small.items() if "to_out" in n or "feed_forward" in n}
    path = tmp_path / "tiny.safetensors"
    tq.make_file(path, "lumina2", "diffusion-pipe", small, seed=2)
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(path)
    assert set(info.value.candidates) == {"lumina2", "zimage"} and len(str(info.value).splitlines()) == 1
    for header, arch in [({"modelspec.architecture": "lumina-2/lora"}, "lumina2"),
                         ({"modelspec.architecture": "Z-Image/lora"}, "zimage"),
                         ({"ss_base_model_version": "zimage"}, "zimage")]:
        tq.make_file(path, "lumina2", "diffusion-pipe", small, seed=2, metadata=header)
        assert loramerge.load(path).arch == arch
    assert loramerge.load(path, arch="lumina2").arch == "lumina2"


def test_qwen_attention_only_in_flux_sized_blocks_is_ambiguous(tmp_path):
    """Qwen-Image and Flux share diffusers' attention names at width 3072: a LoRA of attention
    projections in blocks 0-17 only fits both (and HunyuanVideo); the header (or blocks past
    Flux's 19) decides. Blocks 0-18 reach Flux's last double block, which a Flux LoRA of its
    double blocks does and a Qwen-Image LoRA of 60 blocks would not: Flux.1 or Chroma."""
    attn = re.compile(r"transformer_blocks\.(\d+)\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$")
    path = tmp_path / "a.safetensors"
    nineteen = {n: s for n, s in meta("qwen-image").items() if (m := attn.match(n)) and int(m[1]) < 19}
    tq.make_file(path, "qwen_image", "diffusers", nineteen, seed=1, ranks=(1,))
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(path)
    assert set(info.value.candidates) == {"chroma", "flux"}  # Chroma has Flux.1's double blocks
    modules = {n: s for n, s in meta("qwen-image").items() if (m := attn.match(n)) and int(m[1]) < 18}
    tq.make_file(path, "qwen_image", "diffusers", modules, seed=1, ranks=(1,))
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(path)
    assert {"flux", "qwen_image"} <= set(info.value.candidates)
    tq.make_file(path, "qwen_image", "diffusers", modules, seed=1, ranks=(1,),
                 metadata={"ss_base_model_version": "qwen_image"})
    assert loramerge.load(path).arch == "qwen_image"
    deep = {n: s for n, s in meta("qwen-image").items() if attn.match(n)}
    tq.make_file(path, "qwen_image", "diffusers", deep, seed=1, ranks=(1,))
    assert loramerge.load(path).arch == "qwen_image"


@pytest.mark.parametrize("arch, extra, needle", [
    ("lumina2", {"lora_te_layers_0_self_attn_q_proj": (2304, 2304)}, "Gemma-2"),
    ("qwen_image", {"text_encoder.model.language_model.layers.0.self_attn.q_proj": (3584, 3584)}, "Qwen2.5-VL"),
])
def test_text_encoder_loras_are_refused_naming_the_encoder(tmp_path, arch, extra, needle):
    layout = "sd-scripts" if arch == "lumina2" else "diffusers"
    modules = dict(list(blocks_only(meta(tq.FULL_SIZE[arch])).items())[:6])
    tq.make_file(tmp_path / "t.safetensors", arch, layout, modules, seed=1, ranks=(1,))
    sd = load_file(str(tmp_path / "t.safetensors"))
    style = ("lora_down", "lora_up") if arch == "lumina2" else ("lora_A", "lora_B")
    for key, (rows, cols) in extra.items():
        sd[f"{key}.{style[0]}.weight"] = torch.zeros(1, cols)
        sd[f"{key}.{style[1]}.weight"] = torch.zeros(rows, 1)
    save_file(sd, str(tmp_path / "t.safetensors"))
    with pytest.raises(UnsupportedModuleError) as info:
        loramerge.load(tmp_path / "t.safetensors")
    message = str(info.value)
    assert needle in message and "text encoder" in message and list(extra)[0] in message
    assert len(message.splitlines()) == 1 and str(tmp_path / "t.safetensors") in message


# --------------------------------------------------------------------------------------------
# per-block weights, convert, fuse, attach, extract, inspect/analyze


@pytest.mark.parametrize("arch, spec, blocks, refused", [
    ("qwen_image", {"joint": {"1": 0.25}}, {"transformer_blocks.1.": 0.25}, {"joint": {"60": 1}}),
    ("zimage", {"layer": {"0-1": 0.5}, "noise_refiner": 0}, {"layers.": 0.5, "noise_refiner.": 0.0},
     {"context_refiner": {"2": 1}}),
    ("lumina2", {"block": [0.5, 2], "context_refiner": 0.1}, {"layers.0.": 0.5, "layers.1.": 2.0, "context_refiner.": 0.1},
     {"layer": {"26": 1}}),
])
def test_block_weights_name_real_blocks(tmp_path, arch, spec, blocks, refused):
    model = tq.transformer(arch)
    modules = tq.linears(model)
    layout = list(tq.LAYOUTS[arch])[-1]
    expected = tq.make_file(tmp_path / "a.safetensors", arch, layout, modules, seed=1)
    merged = loramerge.merge([tmp_path / "a.safetensors"], block_weights={"transformer": spec})
    for m in merged:
        weight = next((w for prefix, w in blocks.items() if m.name.startswith(prefix)), 1.0)
        assert torch.allclose(m.delta(torch.float64), weight * expected[m.name], atol=1e-6), m.name
    with pytest.raises(UsageError, match="has .* blocks"):
        loramerge.merge([tmp_path / "a.safetensors"], block_weights={"transformer": refused})


ROUND_TRIP = {"qwen_image": "musubi", "zimage": "musubi", "lumina2": "ai-toolkit"}  # split q/k/v, ranks differ


@pytest.mark.parametrize("arch", tq.ARCHS)
def test_convert_round_trips_between_every_written_format(tmp_path, arch):
    model = tq.transformer(arch)
    expected = tq.make_file(tmp_path / "in.safetensors", arch, ROUND_TRIP[arch], tq.linears(model), seed=7)
    source = loramerge.load(tmp_path / "in.safetensors")
    formats = ("kohya", "comfyui", "diffusers")
    for first in formats:
        loramerge.save(source, tmp_path / f"{first}.safetensors", format=first)
        for second in formats:
            once = loramerge.load(tmp_path / f"{first}.safetensors")
            assert (once.arch, once.format) == (arch, first)
            loramerge.save(once, tmp_path / "twice.safetensors", format=second)
            twice = loramerge.load(tmp_path / "twice.safetensors")
            assert {m.name for m in twice} == set(expected)
            for m in twice:
                assert torch.allclose(m.delta(torch.float64), expected[m.name], rtol=1e-5, atol=1e-7), (first, second, m.name)


# ComfyUI's diffusion_models files are bare, its saved checkpoints say model.diffusion_model.
SINGLE_FILE_PREFIX = {"qwen_image": "", "zimage": "model.diffusion_model.", "lumina2": "diffusion_model."}


@pytest.mark.parametrize("arch", tq.ARCHS)
def test_fuse_into_a_diffusers_folder_and_a_comfyui_single_file(tmp_path, arch):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from loramerge.fuse import fuse

    model = tq.transformer(arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in tq.linears(model)}
    da, db = make_inputs(tmp_path, arch, model)
    expected = linear_sum((da, db), base)
    loras = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]

    model.save_pretrained(tmp_path / "base" / "transformer")  # a diffusers folder: transformer/ only
    fuse(tmp_path / "base", loras, tmp_path / "fused", weights=W)
    back = type(model).from_pretrained(tmp_path / "fused" / "transformer")
    check_weights(back, base, expected)
    assert (tmp_path / "fused" / "transformer" / "config.json").read_text() == \
        (tmp_path / "base" / "transformer" / "config.json").read_text()

    prefix = SINGLE_FILE_PREFIX[arch]
    single = tq.comfy_single_file(arch, model, prefix)
    save_file(single, str(tmp_path / "single.safetensors"))
    report = fuse(tmp_path / "single.safetensors", loras, tmp_path / "fused.safetensors", weights=W)
    assert report.modules == len(base)
    out = load_file(str(tmp_path / "fused.safetensors"))
    assert set(out) == set(single)
    if arch == "zimage":  # diffusers' own single-file converter reads it back
        state = convert_z_image_transformer_checkpoint_to_diffusers(
            {k.removeprefix(prefix): v for k, v in out.items()})
    else:  # Qwen-Image: identity names; Lumina 2: the names checked against diffusers above
        state = {}
        for name in base:
            original, position = tq.ORIGINAL[arch](name)
            tensor = out[prefix + original + ".weight"]
            if original.endswith(".qkv"):
                sizes = [base[original.replace("attention.qkv", f"attn.to_{x}")].shape[0] for x in "qkv"]
                tensor = tensor.split(sizes)[position]
            state[name + ".weight"] = tensor
    fused_model = tq.transformer(arch)
    fused_model.load_state_dict(state, strict=False)
    check_weights(fused_model, base, expected)
    touched = {prefix + tq.ORIGINAL[arch](n)[0] + ".weight" for n in base}
    untouched = set(single) - touched
    assert untouched and all(torch.equal(out[k], single[k]) for k in untouched)


@pytest.mark.parametrize("arch", tq.ARCHS)
def test_attach_to_the_real_pipeline(tmp_path, arch):
    model = tq.transformer(arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in tq.linears(model)}
    da, db = make_inputs(tmp_path, arch, model)
    pipe = tq.pipeline(arch, model)
    assert type(pipe).__name__ == tq.PIPELINES[arch]
    mix = loramerge.attach(pipe, {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"})
    mix.set_weights({"a": W[0], "b": W[1]})
    mix.fuse(scale=1.0)
    check_weights(model, base, linear_sum((da, db), base))
    mix.set_weights({"a": 0.0, "b": 1.0})
    check_weights(model, base, {n: d for n, d in db.items()})
    mix.unfuse()
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in base.items())
    mix.detach()


@pytest.mark.parametrize("arch", tq.ARCHS)
def test_extract_from_two_single_files(tmp_path, arch):
    """tuned = base + known rank-2 deltas, some inside fused qkv tensors (to_k alone)."""
    from loramerge.extract import extract

    model = tq.transformer(arch)
    base = tq.comfy_single_file(arch, model)
    save_file(base, str(tmp_path / "base.safetensors"))
    gen = torch.Generator().manual_seed(9)
    picks = [n for n in tq.linears(model) if n.endswith(("to_k", "to_out.0", "img_mod.1", "w2", "linear_2"))][:4]
    tuned, truth = dict(base), {}
    for name in picks:
        original, position = tq.ORIGINAL[arch](name)
        key = "model.diffusion_model." + original + ".weight"
        rows, cols = model.get_submodule(name).weight.shape
        delta = 0.05 * torch.randn(rows, 2, generator=gen) @ torch.randn(2, cols, generator=gen)
        start = 0
        if original.endswith(".qkv"):
            start = sum(model.get_submodule(original.replace("attention.qkv", f"{'attn' if arch == 'lumina2' else 'attention'}.to_{x}"))
                        .weight.shape[0] for x in "qkv"[:position])
        tuned[key] = tuned[key].clone()
        tuned[key][start:start + rows] += delta
        truth[name] = tuned[key][start:start + rows].double() - base[key][start:start + rows].double()
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=2)
    assert lora.arch == arch and {m.name for m in lora} == set(picks)
    loramerge.save(lora, tmp_path / "x.safetensors", dtype="fp32")
    for m in loramerge.load(tmp_path / "x.safetensors"):
        err = float((m.delta(torch.float64) - truth[m.name]).norm() / truth[m.name].norm())
        assert err < 1e-5, m.name


def test_inspect_and_analyze_run(tmp_path):
    from typer.testing import CliRunner

    from loramerge.cli import app

    model = tq.transformer("qwen_image")
    make_inputs(tmp_path, "qwen_image", model)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "--json", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["architecture"], summary["format"], summary["variant"]) == ("qwen_image", "kohya", None)
    assert "transformer.transformer_blocks.1" in summary["blocks"] and summary["blocks"]["transformer.other"]["modules"] == 6
    result = runner.invoke(app, ["inspect", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0 and "variant       undetermined" in result.output, result.output
    result = runner.invoke(app, ["analyze", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--out", str(tmp_path / "an")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert "transformer.transformer_blocks.0" in json.dumps(report)
