"""Flux.2, Chroma, SD3/3.5, HiDream-I1, Flux.1's rarer formats and cloneofsimo's early format.

Full-size synthetic files (rank 1–2, every LoRA-targeted module of the real model, enumerated on
the meta device) in every format the tools write are read by loramerge and by diffusers' own
converters, and must give the same modules with the same ΔW (checked with random probe vectors:
the dense deltas of full-size modules are too large). Merges of tiny-model LoRAs in different
formats are loaded back by diffusers' loaders and fused, and must equal base + the float64 ΔW
computed here from the input tensors. Known diffusers bugs are pinned.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loramerge
import tiny
import tiny_flux as tf
from loramerge.blocks import block_id, parse_block_weights
from loramerge.errors import AmbiguousArchitectureError, UnsupportedModuleError, UsageError
from loramerge.formats import archs, keymaps

WEIGHTS = (0.7, -0.4)
NEW_VARIANTS = ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "chroma", "hidream-i1"]
_META: dict[str, dict] = {}


def meta_modules(variant: str) -> dict:
    """{("transformer", name): stand-in with a meta ``weight``} for every Linear/Conv of the
    full-size transformer of ``variant``, from the shipped key table (which
    test_shipped_tables_match_the_real_models checks against the model built on meta)."""
    if variant not in _META:
        _META[variant] = {("transformer", n): SimpleNamespace(weight=torch.empty(shape, device="meta"))
                          for n, shape in keymaps.table(variant)["transformer"].items()
                          if len(shape) > 1}  # the tables list norm weights too
    return _META[variant]


def names_of(sd: dict, prefix: str = "transformer.", suffix: str = ".lora_A.weight") -> set[str]:
    return {k[len(prefix):-len(suffix)] for k in sd if k.startswith(prefix) and k.endswith(suffix)}


def probe(module, x: torch.Tensor) -> torch.Tensor:
    """ΔW @ x of a loramerge module, float64, without forming ΔW."""
    up, down = module.factors(torch.float64)
    return module.scale * (up @ (down @ x))


def check_probes(lora, theirs: dict, names, transform=None, tol=1e-6):
    """ΔW·x of loramerge's modules equals lora_B·lora_A·x of diffusers' converted state dict."""
    gen = torch.Generator().manual_seed(0)
    for name in names:
        a = theirs[f"transformer.{name}.lora_A.weight"].double()
        b = theirs[f"transformer.{name}.lora_B.weight"].double()
        x = torch.randn(a.shape[1], generator=gen, dtype=torch.float64)
        want = b @ (a @ x)
        got = probe(lora[f"transformer.{name}"], x)
        if transform:
            got = transform(name, got)
        assert torch.allclose(got, want, rtol=0, atol=tol * float(want.abs().max())), name


def test_shipped_tables_match_the_real_models():
    for variant in NEW_VARIANTS:
        for component, config in keymaps.configs()[variant].items():
            model = keymaps.build_model(config, "meta")
            assert keymaps.table(variant)[component] == {k: tuple(v) for k, v in keymaps.module_shapes(model).items()}


# --------------------------------------------------------------------------------------------
# Flux.2: every format against diffusers' Flux2LoraLoaderMixin.lora_state_dict

FLUX2_KOHYA_DROPPED = re.compile(r"^(norm_out\.linear|time_guidance_embed\.guidance_embedder\..*"
                                 r"|double_stream_modulation_(img|txt)\.linear|single_stream_modulation\.linear)$")


def flux2_full(variant, seed=0):
    mods = meta_modules(variant)
    groups = tf.groups("flux2", [n for _, n in mods])
    return mods, tf.random_factors(mods, seed, ranks=(1, 2), alphas=(1.0, None, 4.0), fused_groups=groups)


def test_flux2_musubi_kohya_matches_diffusers(tmp_path):
    from diffusers import Flux2Pipeline

    mods, factors = flux2_full("flux2-dev")
    path = tmp_path / "musubi.safetensors"
    tf.write_original(path, "flux2", factors, "lora_unet_", "kohya", flat=True,
                      metadata={"ss_network_module": "networks.lora_flux_2"})
    lora = loramerge.load(path)
    assert (lora.arch, lora.variant, lora.format) == ("flux2", "flux2-dev", "kohya")
    ours = {m.name for m in lora}
    assert ours == {n for _, n in mods}
    with tiny.capture_load_warnings() as messages:
        theirs = Flux2Pipeline.lora_state_dict(str(path))
    dropped = {n for n in ours if FLUX2_KOHYA_DROPPED.match(n)}
    # diffusers 0.42 drops the final modulation, guidance_in and the global modulations of kohya files
    assert dropped and names_of(theirs) == ours - dropped
    assert any("Unsupported keys" in m for m in messages)
    check_probes(lora, theirs, names_of(theirs))


def test_flux2_ai_toolkit_matches_diffusers_but_for_its_unswapped_final_modulation(tmp_path):
    """ai-toolkit's diffusion_model.<BFL> lora_A/B (also fal's base_model.model.): diffusers converts
    every module but leaves final_layer.adaLN_modulation.1's lora_B rows in BFL (shift, scale)
    order, unlike its own checkpoint converter. loramerge swaps them; the bug is pinned here."""
    from diffusers import Flux2Pipeline

    mods, factors = flux2_full("flux2-dev", seed=1)
    for prefix in ("diffusion_model.", "base_model.model."):
        path = tmp_path / f"{prefix}safetensors"
        tf.write_original(path, "flux2", factors, prefix, "peft", metadata={"ss_base_model_version": "flux2"})
        lora = loramerge.load(path)
        assert (lora.arch, lora.variant) == ("flux2", "flux2-dev")
        theirs = Flux2Pipeline.lora_state_dict(str(path))
        assert names_of(theirs) == {m.name for m in lora} == {n for _, n in mods}
        check_probes(lora, theirs, names_of(theirs) - {"norm_out.linear"})
        check_probes(lora, theirs, ["norm_out.linear"], transform=lambda _, y: tf.swap(y))  # diffusers' bug
        up, down, alpha = factors[("transformer", "norm_out.linear")]
        x = torch.randn(down.shape[1], dtype=torch.float64)
        want = (alpha or down.shape[0]) / down.shape[0] * (up.double() @ (down.double() @ x))
        assert torch.allclose(probe(lora["transformer.norm_out.linear"], x), want, atol=1e-9)


def test_flux2_diffusers_and_bare_names(tmp_path):
    from diffusers import Flux2KleinPipeline

    mods, factors = flux2_full("flux2-klein-4b", seed=2)
    tf.write_diffusers(tmp_path / "d.safetensors", factors)
    lora = loramerge.load(tmp_path / "d.safetensors")
    assert (lora.arch, lora.variant, lora.format) == ("flux2", "flux2-klein-4b", "diffusers")
    theirs = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "d.safetensors"))
    assert names_of(theirs) == {m.name for m in lora} == {n for _, n in mods}
    # BFL names without a prefix (InvokeAI's "BFL-PEFT"): diffusers converts nothing, loramerge reads them
    tf.write_original(tmp_path / "bare.safetensors", "flux2", factors, "", "peft",
                      metadata={"ss_base_model_version": "flux2_klein_4b"})
    bare = loramerge.load(tmp_path / "bare.safetensors")
    assert bare.arch == "flux2" and {m.name for m in bare} == {n for _, n in mods}
    assert not names_of(Flux2KleinPipeline.lora_state_dict(str(tmp_path / "bare.safetensors")))


def _lokr_file(path, keys_and_shapes, alphas, prefix, flat):
    sd, tensors = {}, {}
    for i, (name, shape) in enumerate(keys_and_shapes):
        t = tf.lokr_tensors(shape, seed=i, r=1 + i % 2)
        key = prefix + (name.replace(".", "_") if flat else name)
        tensors[name] = t
        sd.update({f"{key}.{k}": v for k, v in t.items()})
        if alphas[i % len(alphas)] is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alphas[i % len(alphas)]))
    save_file(sd, str(path))
    return tensors


def test_flux2_lokr_on_fused_qkv_splits_exactly_by_rows(tmp_path):
    """LoKr on BFL names: diffusers maps a double block's qkv to the fused attn.to_qkv (a Kronecker
    delta has no per-member factors); loramerge splits the dense delta by rows, exactly. Also
    SimpleTuner's lycoris_ diffusers names."""
    from diffusers import Flux2KleinPipeline

    mods = meta_modules("flux2-klein-4b")
    groups = tf.groups("flux2", [n for _, n in mods])
    members = {o: ms for o, ms in groups.items() if o.startswith(("double_blocks.0.", "single_blocks.0.", "img_in"))}
    shapes = [(o, (sum(mods[("transformer", m)].weight.shape[0] for m in ms), mods[("transformer", ms[0])].weight.shape[1]))
              for o, ms in sorted(members.items())]
    tensors = _lokr_file(tmp_path / "lokr.safetensors", shapes, (4.0, None), "diffusion_model.", flat=False)
    lora = loramerge.load(tmp_path / "lokr.safetensors")  # klein-4b by its shapes (img_in 128, SwiGLU)
    theirs = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "lokr.safetensors"))
    fused_name = {"double_blocks.0.img_attn.qkv": "transformer_blocks.0.attn.to_qkv",
                  "double_blocks.0.txt_attn.qkv": "transformer_blocks.0.attn.to_added_qkv"}
    gen = torch.Generator().manual_seed(1)
    for orig, ms in sorted(members.items()):
        name = fused_name.get(orig, ms[0])
        t = {k: theirs[f"transformer.{name}.{k}"] for k in ("lokr_w1", "lokr_w2_a", "lokr_w2_b")}
        x = torch.randn(tensors[orig]["lokr_w2_b"].shape[1] * 4, generator=gen, dtype=torch.float64)
        want = tf.lokr_apply(t, x)  # diffusers baked alpha/r into w1
        got = torch.cat([probe(lora[f"transformer.{m}"], x) for m in ms])
        assert torch.allclose(got, want, atol=1e-6 * float(want.abs().max())), orig
    assert {m.name for m in lora} == {m for ms in members.values() for m in ms}
    assert all(m.kind == "lokr" for m in lora)

    # lycoris_ + flattened diffusers names (SimpleTuner): diffusers' LyCORIS Flux.2 converter
    block = [(n, tuple(mods[("transformer", n)].weight.shape)) for _, n in mods
             if n.startswith(("transformer_blocks.1.", "single_transformer_blocks.1."))]
    _lokr_file(tmp_path / "lyco.safetensors", block, (2.0, 8.0), "lycoris_", flat=True)
    lyco = loramerge.load(tmp_path / "lyco.safetensors")
    assert lyco.format == "lycoris"
    theirs = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "lyco.safetensors"))
    assert names_of(theirs, suffix=".lokr_w1") == {m.name for m in lyco} == {n for n, _ in block}
    for name, shape in block:
        t = {k: theirs[f"transformer.{name}.{k}"] for k in ("lokr_w1", "lokr_w2_a", "lokr_w2_b")}
        x = torch.randn(shape[1], generator=gen, dtype=torch.float64)
        want = tf.lokr_apply(t, x)
        assert torch.allclose(probe(lyco[f"transformer.{name}"], x), want, atol=1e-6 * float(want.abs().max())), name
    # bare dotted diffusers names (SimpleTuner exports): diffusers' generic LoKr converter
    _lokr_file(tmp_path / "bare.safetensors", block, (2.0, 8.0), "", flat=False)
    bare = loramerge.load(tmp_path / "bare.safetensors")
    theirs = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "bare.safetensors"))
    assert names_of(theirs, suffix=".lokr_w1") == {m.name for m in bare} == {n for n, _ in block}


# --------------------------------------------------------------------------------------------
# Chroma: Flux.1's loader (FluxLoraLoaderMixin) converts sd-scripts files, not ai-toolkit's

def chroma_full(seed=0, keep=lambda name: True):
    mods = {k: m for k, m in meta_modules("chroma").items() if keep(k[1])}
    groups = tf.groups("chroma", [n for _, n in mods])
    return mods, tf.random_factors(mods, seed, ranks=(1, 2), alphas=(1.0, None, 4.0), fused_groups=groups)


def test_chroma_sd_scripts_matches_diffusers_blocks_and_pins_its_dropped_globals(tmp_path):
    from diffusers import ChromaPipeline

    mods, factors = chroma_full(keep=lambda n: not n.startswith("distilled_guidance_layer."))
    for prefix, flat, label in (("lora_unet_", True, "kohya"), ("diffusion_model.", False, "comfyui")):
        path = tmp_path / f"{label}.safetensors"
        tf.write_original(path, "chroma", factors, prefix, "kohya", flat=flat,
                          metadata={"ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora"})
        lora = loramerge.load(path)
        assert (lora.arch, lora.format) == ("chroma", label)
        ours = {m.name for m in lora}
        assert ours == {n for _, n in mods}
        theirs = ChromaPipeline.lora_state_dict(str(path))
        blocks = names_of(theirs)
        # diffusers 0.42 names img_in, txt_in and final_layer.linear without "transformer.": dropped at load
        unprefixed = names_of(theirs, prefix="")
        assert unprefixed - {f"transformer.{n}" for n in blocks} == {"x_embedder", "context_embedder", "proj_out"}
        assert blocks == ours - {"x_embedder", "context_embedder", "proj_out"}
        check_probes(lora, theirs, blocks)

    # the guidance layer: diffusers refuses the file, loramerge reads it (exact renames)
    mods, factors = chroma_full(seed=3, keep=lambda n: n.startswith(("distilled_guidance_layer.", "transformer_blocks.0.")))
    tf.write_original(tmp_path / "dgl.safetensors", "chroma", factors, "lora_unet_", "kohya", flat=True)
    lora = loramerge.load(tmp_path / "dgl.safetensors")  # the guidance layer is Chroma's alone: no header needed
    assert lora.arch == "chroma" and {m.name for m in lora} == {n for _, n in mods}
    with pytest.raises(ValueError, match="Incompatible keys"):
        ChromaPipeline.lora_state_dict(str(tmp_path / "dgl.safetensors"))


def test_chroma_ai_toolkit_is_read_though_diffusers_loads_nothing(tmp_path):
    from diffusers import ChromaPipeline

    mods, factors = chroma_full(seed=4)
    tf.write_original(tmp_path / "ait.safetensors", "chroma", factors, "diffusion_model.", "peft",
                      metadata={"ss_base_model_version": "chroma"})
    lora = loramerge.load(tmp_path / "ait.safetensors")
    assert (lora.arch, lora.variant, lora.format) == ("chroma", "chroma", "comfyui")
    assert {m.name for m in lora} == {n for _, n in mods}
    gen = torch.Generator().manual_seed(0)
    for key, (up, down, alpha) in list(factors.items())[::7]:
        x = torch.randn(down.shape[1], generator=gen, dtype=torch.float64)
        want = (alpha or down.shape[0]) / down.shape[0] * (up.double() @ (down.double() @ x))
        assert torch.allclose(probe(lora["transformer." + key[1]], x), want, atol=1e-5 * float(want.abs().max()))
    theirs = ChromaPipeline.lora_state_dict(str(tmp_path / "ait.safetensors"))
    assert not names_of(theirs)  # passed through unconverted: nothing under transformer.


def test_flux1_chroma_and_klein_are_told_apart_by_keys_shapes_or_header(tmp_path):
    def file(name, keys, metadata=None):
        gen = torch.Generator().manual_seed(0)
        sd = {}
        for key, (out, inp) in keys.items():
            sd[f"{key}.lora_A.weight"] = torch.randn(1, inp, generator=gen)
            sd[f"{key}.lora_B.weight"] = torch.randn(out, 1, generator=gen)
        save_file(sd, str(tmp_path / name), metadata=metadata)
        return tmp_path / name

    qkv = {"diffusion_model.double_blocks.0.img_attn.qkv": (9216, 3072)}
    with pytest.raises(AmbiguousArchitectureError) as err:
        loramerge.load(file("a.safetensors", qkv))
    assert set(err.value.candidates) == {"flux", "chroma", "flux2"}
    for version, arch in (("chroma", "chroma"), ("flux1", "flux"), ("flux2_klein_4b", "flux2"), ("flux", "flux")):
        assert loramerge.load(file(f"{version}.safetensors", qkv, {"ss_base_model_version": version})).arch == arch
    assert loramerge.load(file("ms.safetensors", qkv, {"modelspec.architecture": "Flux.2-klein-4b"})).arch == "flux2"
    # shapes: Flux.2's SwiGLU doubles img_mlp.0 (klein-4b 18432 rows, Flux.1/Chroma 12288)
    assert loramerge.load(file("b.safetensors", {**qkv, "diffusion_model.double_blocks.0.img_mlp.0": (18432, 3072)})).arch == "flux2"
    # Flux.1 vs Chroma: block-only files fit both; modulation Linears mean Flux.1, the guidance layer Chroma
    blocks = {**qkv, "diffusion_model.single_blocks.20.linear1": (21504, 3072)}
    with pytest.raises(AmbiguousArchitectureError) as err:
        loramerge.load(file("c.safetensors", blocks))
    assert set(err.value.candidates) == {"flux", "chroma"}
    assert "--arch" in str(err.value)
    assert loramerge.load(file("d.safetensors", blocks, {"modelspec.architecture": "chroma/lora"})).arch == "chroma"
    assert loramerge.load(file("e.safetensors", {**blocks, "diffusion_model.double_blocks.0.img_mod.lin": (18432, 3072)})).arch == "flux"
    assert loramerge.load(file("f.safetensors", {**blocks, "diffusion_model.distilled_guidance_layer.in_proj": (5120, 64)})).arch == "chroma"
    # the context decides too: a pipeline's or base model's architecture (load_all's prefer)
    from loramerge.io import load_all

    assert load_all([tmp_path / "c.safetensors"], prefer="chroma")[0].arch == "chroma"


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5: diffusers loads only diffusers names

def sd3_full(variant, seed=0):
    mods = meta_modules(variant)
    groups = tf.groups("sd3", [n for _, n in mods])
    return mods, tf.random_factors(mods, seed, ranks=(1, 2), alphas=(1.0, None, 4.0), fused_groups=groups)


@pytest.mark.parametrize("variant", ["sd3.5-medium", "sd3.5-large"])
def test_sd3_sd_scripts_names_incl_attn2_and_last_context_swap(tmp_path, variant):
    from diffusers import StableDiffusion3Pipeline

    mods, factors = sd3_full(variant)
    tf.write_original(tmp_path / "k.safetensors", "sd3", factors, "lora_unet_", "kohya", flat=True,
                      metadata={"ss_base_model_version": variant.replace("sd3.", "")})
    lora = loramerge.load(tmp_path / "k.safetensors")
    assert (lora.arch, lora.variant, lora.format) == ("sd3", variant, "kohya")
    assert {m.name for m in lora} == {n for _, n in mods}
    gen = torch.Generator().manual_seed(0)
    last = max(int(n.split(".")[1]) for _, n in mods if n.startswith("transformer_blocks."))
    for name in ("norm_out.linear", f"transformer_blocks.{last}.norm1_context.linear", "transformer_blocks.0.attn.to_k",
                 "transformer_blocks.0.norm1.linear", "pos_embed.proj"):
        up, down, alpha = factors[("transformer", name)]
        x = torch.randn(down[0].numel(), generator=gen, dtype=torch.float64)
        r = down.shape[0]
        want = (alpha or r) / r * (up.double().reshape(-1, r) @ (down.double().reshape(r, -1) @ x))
        assert torch.allclose(probe(lora[f"transformer.{name}"], x), want, atol=1e-5 * float(want.abs().max())), name
    assert (variant == "sd3.5-medium") == any(".attn2." in m.name for m in lora)
    # diffusers 0.42 converts nothing for SD3: the sd-scripts file passes through and loads nothing
    theirs = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    assert not names_of(theirs) and set(theirs) == set(load_file(str(tmp_path / "k.safetensors")))


def test_sd3_split_qkv_onetrainer_lycoris_and_diffusers_names(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    mods = {k: m for k, m in meta_modules("sd3.5-medium").items() if k[1].startswith("transformer_blocks.0.")}
    factors = tf.random_factors(mods, 5, ranks=(2, 1), alphas=(2.0, None))
    # sd-scripts split_qkv: q, k, v trained apart, saved as one qkv with down (3r, in), block-diagonal up
    sd = {}
    for orig, members in tf.groups("sd3", [n for _, n in mods]).items():
        ups = [factors[("transformer", m)][0] for m in members]
        downs = [factors[("transformer", m)][1] for m in members]
        key = "lora_unet_" + orig.replace(".", "_")
        sd[f"{key}.lora_up.weight"] = torch.block_diag(*ups)
        sd[f"{key}.lora_down.weight"] = torch.cat(downs)
        sd[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(sd, str(tmp_path / "split.safetensors"), metadata={"ss_base_model_version": "5-medium"})
    lora = loramerge.load(tmp_path / "split.safetensors")
    gen = torch.Generator().manual_seed(1)
    for (_, name), (up, down, _) in factors.items():
        members = next(ms for ms in tf.groups("sd3", [n for _, n in mods]).values() if name in ms)
        rows = sum(factors[("transformer", m)][1].shape[0] for m in members)
        x = torch.randn(down.shape[1], generator=gen, dtype=torch.float64)
        # every reader (sd-scripts, ComfyUI, diffusers' Flux converter) scales by alpha / rows(down)
        want = 3.0 / rows * (up.double() @ (down.double() @ x))
        assert lora[f"transformer.{name}"].rank == down.shape[0]
        assert torch.allclose(probe(lora[f"transformer.{name}"], x), want, atol=1e-5 * float(want.abs().max())), name
    # ComfyUI's own files: MMDiT names under diffusion_model. (fused qkv, scale folded)
    tf.write_original(tmp_path / "comfy.safetensors", "sd3", {("transformer", n): f for (_, n), f in
                      tf.random_factors(mods, 6, fused_groups=tf.groups("sd3", [n for _, n in mods])).items()},
                      "diffusion_model.", "peft", metadata={"modelspec.architecture": "stable-diffusion-3-5-medium/lora"})
    comfy = loramerge.load(tmp_path / "comfy.safetensors")
    assert (comfy.arch, comfy.variant, comfy.format) == ("sd3", "sd3.5-medium", "comfyui") and len(comfy) == len(mods)
    assert not names_of(StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "comfy.safetensors")))
    for prefix, style, label in (("lora_transformer_", "kohya", "onetrainer"), ("lycoris_", "kohya", "lycoris"),
                                 ("transformer.", "peft", "diffusers"), ("base_model.model.", "peft", "diffusers")):
        path = tmp_path / f"{label}{prefix}safetensors"
        tf.write_diffusers_style(path, {("transformer", n): f for (_, n), f in factors.items()}, prefix, style,
                                 metadata={"ss_base_model_version": "sd3"})
        lora = loramerge.load(path)
        assert lora.arch == "sd3" and lora.format == label and len(lora) == len(factors)
        theirs = StableDiffusion3Pipeline.lora_state_dict(str(path))
        assert names_of(theirs) == ({n for _, n in factors} if prefix == "transformer." else set())


# --------------------------------------------------------------------------------------------
# HiDream: diffusers names = original names; MoE experts

def test_hidream_ai_toolkit_diffusers_and_kohya_names(tmp_path):
    from diffusers import HiDreamImagePipeline

    mods = meta_modules("hidream-i1")
    factors = tf.random_factors(mods, 6, ranks=(1, 2), alphas=(1.0, None, 4.0))
    assert sum(".ff_i.experts." in n for _, n in mods) == 48 * 4 * 3
    tf.write_original(tmp_path / "ait.safetensors", "hidream", factors, "diffusion_model.", "peft",
                      metadata={"ss_base_model_version": "hidream_i1"})
    lora = loramerge.load(tmp_path / "ait.safetensors")
    assert (lora.arch, lora.variant, lora.format) == ("hidream", "hidream-i1", "comfyui")
    theirs = HiDreamImagePipeline.lora_state_dict(str(tmp_path / "ait.safetensors"))
    assert names_of(theirs) == {m.name for m in lora} == {n for _, n in mods}
    check_probes(lora, theirs, sorted(names_of(theirs))[::11])
    tf.write_diffusers(tmp_path / "d.safetensors", factors)
    assert {m.name for m in loramerge.load(tmp_path / "d.safetensors")} == {n for _, n in mods}
    some = dict(list(factors.items())[:40])
    for prefix in ("lora_unet_", "lycoris_"):  # OneTrainer KOHYA, SimpleTuner LyCORIS: diffusers loads neither
        tf.write_diffusers_style(tmp_path / f"{prefix}.safetensors", some, prefix, "kohya")
        assert {m.name for m in loramerge.load(tmp_path / f"{prefix}.safetensors")} == {n for _, n in some}
        assert not names_of(HiDreamImagePipeline.lora_state_dict(str(tmp_path / f"{prefix}.safetensors")))


# --------------------------------------------------------------------------------------------
# Flux.1's rarer formats

def flux1_full(seed=0, keep=lambda name: True, ranks=(1, 2), alphas=(1.0, None, 4.0)):
    mods = {k: m for k, m in meta_modules("flux").items() if keep(k[1])}
    groups = tf.groups("flux", [n for _, n in mods])
    return mods, tf.random_factors(mods, seed, ranks=ranks, alphas=alphas, fused_groups=groups)


def test_flux1_xlabs_matches_diffusers(tmp_path):
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(0)
    sd, h = {}, 3072
    for i in range(19):
        for proc, out, inp in (("qkv_lora1", 3 * h, h), ("qkv_lora2", 3 * h, h), ("proj_lora1", h, h), ("proj_lora2", h, h)):
            sd[f"double_blocks.{i}.processor.{proc}.down.weight"] = torch.randn(2, inp, generator=gen)
            sd[f"double_blocks.{i}.processor.{proc}.up.weight"] = torch.randn(out, 2, generator=gen)
    for i in range(38):
        for proc, out, inp in (("qkv_lora", 3 * h, h), ("proj_lora", h, 5 * h)):
            sd[f"single_blocks.{i}.processor.{proc}.down.weight"] = torch.randn(1, inp, generator=gen)
            sd[f"single_blocks.{i}.processor.{proc}.up.weight"] = torch.randn(out, 1, generator=gen)
    for prefix in ("", "diffusion_model."):
        path = tmp_path / f"xlabs{prefix}safetensors"
        save_file({prefix + k: v for k, v in sd.items()}, str(path))
        lora = loramerge.load(path)
        assert (lora.arch, lora.format) == ("flux", "xlabs")
        theirs = FluxPipeline.lora_state_dict(str(path))
        assert names_of(theirs) == {m.name for m in lora}
        assert len(lora) == 19 * 8 + 38 * 4 and all(m.alpha == m.rank for m in lora)  # x-flux: scale 1
        check_probes(lora, theirs, names_of(theirs))


def test_flux1_onetrainer_mixture_attention_matches_diffusers_and_dora_needs_a_base(tmp_path):
    """OneTrainer's LEGACY Flux files: lora_transformer_ + diffusers names (flattened), lora_te1_
    CLIP-L, lora_te2_ T5. diffusers maps attention modules right but files every other block
    module under the block root (pinned); loramerge places them all."""
    from diffusers import FluxPipeline

    mods, factors = flux1_full(keep=lambda n: n.startswith(("transformer_blocks.3.", "single_transformer_blocks.7.",
                                                            "norm_out", "x_embedder")), alphas=(1.0, 4.0))
    tf.write_diffusers_style(tmp_path / "ot.safetensors", factors, "lora_transformer_", "kohya")
    with safe_open(str(tmp_path / "ot.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(0)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 768, generator=gen)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(768, 2, generator=gen)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "ot.safetensors"))
    lora = loramerge.load(tmp_path / "ot.safetensors")
    assert (lora.arch, lora.format) == ("flux", "onetrainer")
    assert {m.key for m in lora} == {f"transformer.{n}" for _, n in mods} | {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    theirs = FluxPipeline.lora_state_dict(str(tmp_path / "ot.safetensors"))
    attention = {n for _, n in mods if ".attn." in n} | {"norm_out.linear", "x_embedder"}
    assert attention <= names_of(theirs)
    check_probes(lora, theirs, attention)
    assert {"transformer_blocks.3", "single_transformer_blocks.7"} <= names_of(theirs)  # diffusers' mis-mapping
    # T5 (lora_te2_): diffusers' converter asserts; loramerge reads it as text_encoder_2
    t5 = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    save_file({**sd, f"{t5}.lora_down.weight": torch.randn(2, 4096), f"{t5}.lora_up.weight": torch.randn(4096, 2),
               f"{t5}.alpha": torch.tensor(2.0)}, str(tmp_path / "t5.safetensors"))
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in loramerge.load(tmp_path / "t5.safetensors")
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(str(tmp_path / "t5.safetensors"))
    # DoRA (OneTrainer's dora_scale, per input column): read, and refused by a merge without a base
    dora = "lora_transformer_transformer_blocks_3_attn_to_q"
    save_file({**sd, f"{dora}.dora_scale": torch.ones(1, 3072)}, str(tmp_path / "dora.safetensors"))
    with_dora = loramerge.load(tmp_path / "dora.safetensors")
    assert with_dora["transformer.transformer_blocks.3.attn.to_q"].needs_base
    with pytest.raises(UnsupportedModuleError, match=r"transformer_blocks\.3\.attn\.to_q is DoRA.*--base"):
        loramerge.merge([with_dora])


def test_flux1_lokr_with_bfl_names(tmp_path):
    """LyCORIS LoKr on BFL names (ComfyUI reads it; diffusers 0.42 refuses Flux.1 LoKr): fused qkv
    and linear1 split exactly by rows of the Kronecker delta."""
    from diffusers import FluxPipeline

    mods = meta_modules("flux")
    groups = tf.groups("flux", [n for _, n in mods])
    chosen = {o: ms for o, ms in groups.items() if o.startswith(("double_blocks.2.", "single_blocks.5."))}
    shapes = [(o, (sum(mods[("transformer", m)].weight.shape[0] for m in ms), mods[("transformer", ms[0])].weight.shape[1]))
              for o, ms in sorted(chosen.items())]
    for prefix, flat in (("diffusion_model.", False), ("lora_unet_", True)):
        path = tmp_path / f"lokr{prefix}safetensors"
        tensors = _lokr_file(path, shapes, (4.0, None), prefix, flat=flat)
        lora = loramerge.load(path)  # Flux.1 by its modulation Linears
        assert lora.format == "lycoris" and {m.name for m in lora} == {m for ms in chosen.values() for m in ms}
        gen = torch.Generator().manual_seed(2)
        for i, (orig, ms) in enumerate(sorted(chosen.items())):
            t = tensors[orig]
            x = torch.randn(t["lokr_w2_b"].shape[1] * 4, generator=gen, dtype=torch.float64)
            want = tf.lokr_apply(t, x, alpha=(4.0, None)[i % 2])
            got = torch.cat([probe(lora[f"transformer.{m}"], x) for m in ms])
            assert torch.allclose(got, want, atol=1e-6 * float(want.abs().max())), orig
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        tiny.flux_pipeline().load_lora_weights(str(tmp_path / "lokrdiffusion_model.safetensors"))


def test_flux1_bfl_control_lora_is_refused_and_its_bias_deltas_read(tmp_path):
    """FLUX.1-Depth/Canny-dev-lora: bare BFL names, lora_B.bias on every module, RMSNorm scales
    that replace base weights, an img_in on the widened 128-channel input. The norms and the
    widened input have no ΔW on FLUX.1: the file is refused naming the format. Its LoRA modules
    with bias deltas (the rest) are exact: read, and split like diffusers' converter splits them."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    mods, factors = flux1_full(seed=7, ranks=(2,), alphas=(None,))
    sd = tf.write_original(tmp_path / "noop.safetensors", "flux", factors, "", "peft")
    gen = torch.Generator().manual_seed(3)
    for key in [k for k in sd if k.endswith(".lora_B.weight")]:
        sd[key.replace(".weight", ".bias")] = torch.randn(sd[key].shape[0], generator=gen)
    sd["img_in.lora_A.weight"] = torch.randn(2, 128, generator=gen)
    norms = {f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale": torch.ones(128)
             for i in range(19) for s in ("img", "txt") for q in ("query", "key")}
    norms.update({f"single_blocks.{i}.norm.{q}_norm.scale": torch.ones(128) for i in range(38) for q in ("query", "key")})
    save_file({**sd, **norms}, str(tmp_path / "depth.safetensors"))
    with pytest.raises(UnsupportedModuleError, match="BFL Flux control LoRA") as err:
        loramerge.load(tmp_path / "depth.safetensors")
    assert len(str(err.value).splitlines()) == 1
    theirs = _convert_bfl_flux_control_lora_to_diffusers({**sd, **norms})
    exact = {k: v for k, v in sd.items() if not k.startswith("img_in.")}
    save_file(exact, str(tmp_path / "bias.safetensors"), metadata={"ss_base_model_version": "flux1"})
    lora = loramerge.load(tmp_path / "bias.safetensors")
    assert {m.name for m in lora} == names_of(theirs) - {"x_embedder"}
    check_probes(lora, theirs, sorted(names_of(theirs) - {"x_embedder"})[::5])
    names = ("transformer_blocks.4.attn.to_k", "single_transformer_blocks.9.proj_mlp", "norm_out.linear",
             "transformer_blocks.0.norm1.linear")
    for name in names:
        assert torch.allclose(lora[f"transformer.{name}"].bias_delta(), theirs[f"transformer.{name}.lora_B.bias"]), name
    # bias deltas survive every written format (kohya: diff_b on the fused module; PEFT: lora_B.bias)
    some = loramerge.LoRA([lora[f"transformer.{n}"] for n in names] + [lora["transformer.transformer_blocks.4.attn.to_q"]],
                          "flux")
    for fmt in ("kohya", "comfyui", "diffusers"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loramerge.save(some, tmp_path / f"{fmt}.safetensors", format=fmt)
        back = loramerge.load(tmp_path / f"{fmt}.safetensors")
        for name in names:
            assert torch.allclose(back[f"transformer.{name}"].bias_delta(), lora[f"transformer.{name}"].bias_delta(),
                                  atol=1e-6), (fmt, name)
        assert "transformer.transformer_blocks.4.attn.to_v" not in back  # the fused qkv's absent member stays absent


def test_flux1_fal_kontext_and_ai_toolkit_names(tmp_path):
    """fal's Kontext LoRAs (base_model.model. + BFL, every block module): diffusers' converter and
    loramerge agree. ai-toolkit's diffusion_model. + BFL: diffusers 0.42 converts nothing for Flux.1."""
    from diffusers import FluxPipeline

    mods, factors = flux1_full(seed=8, keep=lambda n: n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                               or n == "proj_out")
    tf.write_original(tmp_path / "fal.safetensors", "flux", factors, "base_model.model.", "peft")
    lora = loramerge.load(tmp_path / "fal.safetensors")
    assert lora.arch == "flux" and lora.format == "bfl"
    theirs = FluxPipeline.lora_state_dict(str(tmp_path / "fal.safetensors"))
    assert names_of(theirs) == {m.name for m in lora} == {n for _, n in mods}
    check_probes(lora, theirs, sorted(names_of(theirs))[::3])
    tf.write_original(tmp_path / "ait.safetensors", "flux", factors, "diffusion_model.", "peft")
    assert {m.name for m in loramerge.load(tmp_path / "ait.safetensors")} == {n for _, n in mods}
    assert not names_of(FluxPipeline.lora_state_dict(str(tmp_path / "ait.safetensors")))


# --------------------------------------------------------------------------------------------
# diffusers as the client: merges of tiny-model LoRAs in two formats, loaded and fused

# per architecture: the two inputs (writer, prefix, style, dtype) and the header their tools write
CLIENT = {
    "flux2": (("original", "lora_unet_", "kohya", torch.float16), ("original", "diffusion_model.", "peft", torch.float32),
              {"ss_base_model_version": "flux2"}),
    "chroma": (("original", "lora_unet_", "kohya", torch.float16), ("original", "diffusion_model.", "peft", torch.float32),
               {"ss_base_model_version": "chroma"}),
    "sd3": (("original", "lora_unet_", "kohya", torch.float16), ("diffusers", "lora_transformer_", "kohya", torch.float32),
            {"ss_base_model_version": "5-medium"}),
    "hidream": (("metadata", "transformer.", "peft", torch.float16), ("original", "diffusion_model.", "peft", torch.float32),
                {"ss_base_model_version": "hidream_i1"}),
}


def write_input(path, arch, factors, how, metadata):
    kind, prefix, style, dtype = how
    if kind == "original":
        tf.write_original(path, arch, factors, prefix, style, dtype=dtype, flat=prefix.endswith("_"), metadata=metadata)
    elif kind == "diffusers":
        tf.write_diffusers_style(path, factors, prefix, style, dtype=dtype, metadata=metadata)
    else:
        tf.write_diffusers(path, factors, dtype=dtype)


def client_inputs(arch, folder):
    """Two LoRA files for the tiny ``arch`` pipeline: A on every module (fp16, ranks and alphas
    varying per module), B on all but A's last module plus … (fp32); returns (pipe, mods, [a, b], paths)."""
    pipe = tf.pipeline(arch, guidance=True)
    mods = tf.modules(pipe)
    groups = tf.groups(arch, [n for _, n in mods])
    how_a, how_b, metadata = CLIENT[arch]
    only_a = ("transformer", "proj_out") if arch != "hidream" else ("transformer", "final_layer.linear")
    only_b = ("transformer", "context_embedder") if arch != "hidream" else ("transformer", "x_embedder.proj")
    a = tf.random_factors({k: v for k, v in mods.items() if k != only_b}, 1, fused_groups=groups, dtype=how_a[3])
    b = tf.random_factors({k: v for k, v in mods.items() if k != only_a}, 2, ranks=(1, 2), alphas=(None, 2.0, 0.5),
                          fused_groups=groups)
    paths = [folder / "a.safetensors", folder / "b.safetensors"]
    write_input(paths[0], arch, a, how_a, metadata)
    write_input(paths[1], arch, b, how_b, metadata)
    return pipe, mods, [a, b], paths


def load_and_fuse(arch, path):
    """A fresh tiny pipeline with ``path`` loaded by diffusers and fused; (pipe, injected, warnings)."""
    pipe = tf.pipeline(arch, guidance=True)
    with tiny.capture_load_warnings() as messages:
        pipe.load_lora_weights(str(path), adapter_name="m")
    injected = tiny.lora_layers(pipe.transformer, "m")
    if injected:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["m"])
    return pipe, injected, messages


def assert_fused(pipe, mods, want, skip=(), tol=1e-5):
    for key, (target, delta) in want.items():
        if key[1] in skip:
            continue
        got = tiny.weight_of(pipe, *key).detach().double()
        err = float((got - target).norm() / delta.norm().clamp_min(1e-12))
        assert err < tol, f"{key[1]}: relative error {err:.2e}"


ALARMS = ("unexpected keys", "missing keys", "not loaded", "unsupported keys", "incompatible keys", "no lora keys")


def alarms(messages):
    """Load warnings that mean something was not loaded (the tiny pipelines have no text encoders:
    Flux.1's loader, which Chroma uses, reports finding no LoRA keys for the missing one)."""
    return [m for m in messages if any(a in m.lower() for a in ALARMS) and "NoneType" not in m]


@pytest.mark.parametrize("arch, out_format", [(a, f) for a in ("flux2", "chroma", "sd3", "hidream")
                                              for f in archs.spec(a).formats])
def test_diffusers_loads_and_fuses_the_linear_merge(tmp_path, arch, out_format):
    pipe, mods, inputs, paths = client_inputs(arch, tmp_path)
    la, lb = loramerge.load(paths[0]), loramerge.load(paths[1])
    assert la.arch == lb.arch == arch and {m.dtype for m in la} == {torch.float16}
    merged = loramerge.merge([la, lb], weights=WEIGHTS, method="linear")
    assert {m.name for m in merged} == {n for _, n in mods}
    noted = [n for n in archs.spec(arch).notes if n.format == out_format and any(re.search(n.pattern, m.key) for m in merged)]
    with pytest.warns(UserWarning, match="diffusers 0.42") if noted else contextlib.nullcontext():  # the writer names client gaps
        loramerge.save(merged, tmp_path / "m.safetensors", format=out_format)
    assert bool(noted) == (out_format != "diffusers" and arch != "hidream")
    want = tf.expected(mods, inputs, WEIGHTS)
    names = {n for _, n in mods}

    if arch == "chroma" and out_format == "kohya":
        # diffusers' kohya Flux converter splits linear1 with Flux.1's fixed sizes (an assertion at this
        # tiny width) and refuses the guidance layer (test_chroma_sd_scripts_matches_diffusers…)
        with pytest.raises((AssertionError, ValueError)):
            load_and_fuse(arch, tmp_path / "m.safetensors")
        return
    pipe, injected, messages = load_and_fuse(arch, tmp_path / "m.safetensors")
    if (arch, out_format) in (("chroma", "comfyui"), ("sd3", "kohya")):  # pinned: diffusers loads nothing
        assert not injected and any("no lora keys" in m.lower() for m in messages)
        return
    skip = set()
    if arch == "flux2" and out_format == "kohya":
        skip = {n for n in names if FLUX2_KOHYA_DROPPED.match(n)}
        assert skip and any("unsupported keys" in m.lower() for m in messages)
        for name in skip:  # dropped by diffusers' kohya Flux.2 converter: untouched
            key = ("transformer", name)
            assert torch.equal(tiny.weight_of(pipe, *key).detach(), mods[key].weight.detach())
    else:
        assert not alarms(messages), messages
    assert len(injected) == len(names) - len(skip)
    if arch == "flux2" and out_format == "comfyui":  # diffusers' ai-toolkit Flux.2 converter does not swap
        key = ("transformer", "norm_out.linear")
        base, delta = want[key][0] - want[key][1], want[key][1]
        got = tiny.weight_of(pipe, *key).detach().double()
        assert torch.allclose(got, base + tf.swap(delta), atol=1e-5) and not torch.allclose(got, want[key][0], atol=1e-3)
        skip = {"norm_out.linear"}
    assert_fused(pipe, mods, want, skip)


@pytest.mark.parametrize("arch, method", [("flux2", "ties"), ("chroma", "svd"), ("sd3", "ties"), ("hidream", "svd")])
def test_diffusers_loads_a_ties_or_svd_merge_in_the_default_format(tmp_path, arch, method):
    pipe, mods, inputs, paths = client_inputs(arch, tmp_path)
    params = {"rank": 3} if method == "svd" else {"density": 0.5}
    merged = loramerge.merge(paths, weights=WEIGHTS, method=method, **params)
    fmt = loramerge.save(merged, tmp_path / "m.safetensors")
    assert fmt == archs.spec(arch).default_format
    want = {}
    for key, module in mods.items():
        w0 = module.weight.detach().double()
        d = merged[f"transformer.{key[1]}"].delta(torch.float64).reshape(w0.shape)
        want[key] = (w0 + d, d)
    pipe, injected, messages = load_and_fuse(arch, tmp_path / "m.safetensors")
    assert not alarms(messages), messages
    assert len(injected) == len(mods)
    skip = {"norm_out.linear"} if arch == "flux2" else set()  # the default comfyui format: diffusers' swap bug
    assert_fused(pipe, mods, want, skip)


# --------------------------------------------------------------------------------------------
# fuse (diffusers folder, single file), attach, extract

def test_single_file_names_agree_with_diffusers_checkpoint_converters():
    """The original-name tables of tiny_flux, turned into single files, convert back to the
    model's exact state dict with diffusers' own converters (Flux.2, SD3, HiDream; Chroma's and
    Flux.1's converters hard-code 3072 wide blocks: their names are checked at full size on meta)."""
    from diffusers.loaders import single_file_utils as sfu

    for arch, convert, prefix in (("flux2", sfu.convert_flux2_transformer_checkpoint_to_diffusers, ""),
                                  ("sd3", sfu.convert_sd3_transformer_checkpoint_to_diffusers, "model.diffusion_model."),
                                  ("hidream", sfu.convert_hidream_transformer_to_diffusers, "model.diffusion_model.")):
        model = tf.pipeline(arch, guidance=True).transformer
        back = convert(tf.single_file_state(arch, model, prefix))
        ref = model.state_dict()
        assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref), arch
    for arch, variant, convert in (("chroma", "chroma", sfu.convert_chroma_transformer_checkpoint_to_diffusers),
                                   ("flux", "flux", sfu.convert_flux_transformer_checkpoint_to_diffusers)):
        model = keymaps.build_model(keymaps.configs()[variant]["transformer"], "meta")
        back = convert(tf.single_file_state(arch, model))
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


FUSE_ARCHS = ["flux2", "chroma", "sd3", "hidream"]
SINGLE_PREFIX = {"flux2": "", "chroma": "model.diffusion_model.", "sd3": "model.diffusion_model.",
                 "hidream": "model.diffusion_model."}


def _expected_model(pipe, mods, want):
    import copy

    model = copy.deepcopy(pipe.transformer)
    for (_, name), (target, _) in want.items():
        model.get_submodule(name).weight.data = target.float()
    return model


@pytest.mark.parametrize("arch", FUSE_ARCHS)
def test_fuse_into_a_diffusers_folder_and_a_single_file(tmp_path, arch):
    from loramerge.fuse import fuse

    pipe, mods, inputs, paths = client_inputs(arch, tmp_path)
    want = tf.expected(mods, inputs, WEIGHTS)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    fuse(tmp_path / "pipe", paths, tmp_path / "fused", weights=WEIGHTS)
    sd = {k: v for f in (tmp_path / "fused" / "transformer").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for (_, name), (target, delta) in want.items():
        err = float((sd[f"{name}.weight"].double() - target).norm() / delta.norm())
        assert err < 1e-5, (name, err)
    base_sd = pipe.transformer.state_dict()
    untouched = [k for k in base_sd if not k.endswith(".weight") or k[:-7] not in {n for _, n in mods}]
    assert untouched and all(torch.equal(sd[k], base_sd[k]) for k in untouched)

    prefix = SINGLE_PREFIX[arch]
    save_file(tf.single_file_state(arch, pipe.transformer, prefix), str(tmp_path / "single.safetensors"))
    fuse(tmp_path / "single.safetensors", paths, tmp_path / "fused.safetensors", weights=WEIGHTS)
    got = load_file(str(tmp_path / "fused.safetensors"))
    ref = tf.single_file_state(arch, _expected_model(pipe, mods, want), prefix)
    base = tf.single_file_state(arch, pipe.transformer, prefix)
    assert set(got) == set(ref)
    changed = 0
    for key in ref:
        if torch.equal(base[key], ref[key]):
            assert torch.equal(got[key], base[key]), key
            continue
        changed += 1
        err = float((got[key].double() - ref[key].double()).norm() / (ref[key].double() - base[key].double()).norm())
        assert err < 1e-5, (key, err)
    assert changed == len(tf.groups(arch, [n for _, n in mods]))


@pytest.mark.parametrize("arch", FUSE_ARCHS)
def test_attach_to_a_pipeline_object(tmp_path, arch):
    pipe, mods, inputs, paths = client_inputs(arch, tmp_path)
    want = tf.expected(mods, inputs, WEIGHTS)
    original = {k: m.weight.detach().clone() for k, m in mods.items()}
    mix = loramerge.attach(pipe, {"a": paths[0], "b": paths[1]})
    assert {lora.arch for lora in mix.loras.values()} == {arch}
    mix.set_weights({"a": WEIGHTS[0], "b": WEIGHTS[1]})
    mix.fuse(scale=1.0)
    assert_fused(pipe, mods, want)
    mix.unfuse()
    assert all(torch.equal(m.weight, original[k]) for k, m in mods.items())
    mix.detach()


@pytest.mark.parametrize("arch", FUSE_ARCHS)
def test_extract_from_two_single_files(tmp_path, arch):
    from loramerge.extract import extract

    pipe = tf.pipeline(arch, guidance=True)
    prefix = SINGLE_PREFIX[arch]
    base = tf.single_file_state(arch, pipe.transformer, prefix)
    save_file(base, str(tmp_path / "base.safetensors"))
    names = [n for _, n in tf.modules(pipe)]
    fused = [o for o, ms in tf.groups(arch, names).items() if len(ms) > 1]
    chosen = {(fused[0] if fused else names[0]), tf.original(arch, names[-1])[0]}
    gen = torch.Generator().manual_seed(4)
    tuned, truth = dict(base), {}
    for orig in chosen:
        key = f"{prefix}{orig}.weight"
        w = base[key]
        d = (torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w[0].numel(), generator=gen)).reshape(w.shape) * 0.1
        tuned[key] = w + d
        truth[orig] = tuned[key] - w
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=4)
    assert lora.arch == arch
    got = {}
    for m in lora:
        orig, position = tf.original(arch, m.name)
        got.setdefault(orig, {})[position] = m.delta(torch.float64).reshape(m.shape[0], -1)
    assert set(got) == chosen
    for orig, parts in got.items():
        t = truth[orig].double().reshape(truth[orig].shape[0], -1)
        mine = torch.cat([parts[p] for p in sorted(parts)])
        if tf.swapped(arch, orig, t.shape):
            mine = tf.swap(mine)
        assert mine.shape == t.shape and torch.allclose(mine, t, atol=1e-4 * float(t.abs().max())), orig


# --------------------------------------------------------------------------------------------
# cloneofsimo/lora (SD1.x/2.x): unnamed entries in a known module order

def _cloneofsimo_modules(order="old", text_layers=12, width=768):
    """The modules cloneofsimo's walk lists, written out here: UNet transformer blocks (down,
    up, mid), each attn1 q k v out, GEGLU proj, attn2 q k v out ("new": attn2 before the GEGLU)."""
    blocks = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    blocks += [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)] + ["mid_block.attentions.0"]
    channels = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "up_blocks.1": 1280,
                "up_blocks.2": 640, "up_blocks.3": 320, "mid_block.attentions": 1280}
    attn1 = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    attn2 = [x.replace("attn1", "attn2") for x in attn1]
    inner = attn1 + ["ff.net.0.proj"] + attn2 if order == "old" else attn1 + attn2 + ["ff.net.0.proj"]
    unet = []
    for block in blocks:
        c = next(v for k, v in channels.items() if block.startswith(k))
        for x in inner:
            shape = (8 * c, c) if x.startswith("ff") else (c, width) if x in ("attn2.to_k", "attn2.to_v") else (c, c)
            unet.append((f"{block}.transformer_blocks.0.{x}", shape))
    text = [(f"text_model.encoder.layers.{i}.self_attn.{p}_proj", (width, width))
            for i in range(text_layers) for p in ("k", "v", "q", "out")]
    return unet, text


def test_cloneofsimo_safeloras_and_pt_lists_are_read_in_their_module_order(tmp_path):
    gen = torch.Generator().manual_seed(0)
    unet, text = _cloneofsimo_modules()
    tensors, meta, truth = {}, {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]),
                                "text_encoder": json.dumps(["CLIPAttention"])}, {}
    for model, mods in (("unet", unet), ("text_encoder", text)):
        for i, (name, (out, inp)) in enumerate(mods):
            r = 1 + i % 4
            up, down = torch.randn(out, r, generator=gen).half(), torch.randn(r, inp, generator=gen).half()
            tensors[f"{model}:{i}:up"], tensors[f"{model}:{i}:down"] = up, down
            meta[f"{model}:{i}:rank"] = str(r)
            truth[f"{model}.{name}"] = (up, down)
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=meta)
    lora = loramerge.load(tmp_path / "lora.safetensors")
    assert (lora.arch, lora.format, len(lora)) == ("sd1", "cloneofsimo", 144 + 48)
    for key, (up, down) in truth.items():
        assert torch.equal(lora[key].delta(), (up.float() @ down.float()).reshape(lora[key].shape)), key  # scale 1
    # the .pt list: [up0, down0, up1, down1, …], the text encoder in <name>.text_encoder.pt
    torch.save([t for i in range(144) for t in (tensors[f"unet:{i}:up"], tensors[f"unet:{i}:down"])], tmp_path / "l.pt")
    torch.save([t for i in range(48) for t in (tensors[f"text_encoder:{i}:up"], tensors[f"text_encoder:{i}:down"])],
               tmp_path / "l.text_encoder.pt")
    assert {m.key for m in loramerge.load(tmp_path / "l.pt")} == {k for k in truth if k.startswith("unet.")}
    assert {m.key for m in loramerge.load(tmp_path / "l.text_encoder.pt")} == {k for k in truth if k.startswith("text_")}
    # trained with a later diffusers (attn2 registered before ff): told apart by shapes; SD2 by widths
    for order, layers, width, arch in (("new", 12, 768, "sd1"), ("old", 23, 1024, "sd2")):
        unet, text = _cloneofsimo_modules(order, layers, width)
        sd = {}
        for model, mods in (("unet", unet), ("text_encoder", text)):
            for i, (name, (out, inp)) in enumerate(mods):
                sd[f"{model}:{i}:up"], sd[f"{model}:{i}:down"] = torch.randn(out, 1), torch.randn(1, inp)
        save_file(sd, str(tmp_path / f"{order}{layers}.safetensors"))
        got = loramerge.load(tmp_path / f"{order}{layers}.safetensors")
        assert got.arch == arch and {m.name for m in got} == {n for n, _ in unet + text}
        assert got["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"].shape == (2560, 320)
    # what cannot be placed is refused, naming the format
    meta["unet"] = json.dumps(["CrossAttention", "Attention", "GEGLU", "ResnetBlock2D"])
    save_file(tensors, str(tmp_path / "ext.safetensors"), metadata=meta)
    with pytest.raises(UnsupportedModuleError, match="cloneofsimo lora format: unet targets .*ResnetBlock2D"):
        loramerge.load(tmp_path / "ext.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("unet:143:")}, str(tmp_path / "short.safetensors"))
    with pytest.raises(loramerge.LoraMergeError, match="cloneofsimo lora format: its 143 unnamed unet entries fit no"):
        loramerge.load(tmp_path / "short.safetensors")
    save_file({**tensors, "<s1>": torch.randn(768)}, str(tmp_path / "ti.safetensors"))
    with pytest.raises(UnsupportedModuleError, match="cloneofsimo lora format: '<s1>'"):
        loramerge.load(tmp_path / "ti.safetensors")


# --------------------------------------------------------------------------------------------
# per-block weights, conversions between written formats, inspect / analyze

@pytest.mark.parametrize("arch, spec, expect, past", [
    ("flux2", {"double": {"0-3": 0.5}, "single": {"40-47": 0.8}},
     {"transformer_blocks.2.attn.to_q": ("double.2", 0.5), "single_transformer_blocks.45.attn.to_out": ("single.45", 0.8),
      "single_transformer_blocks.3.attn.to_qkv_mlp_proj": ("single.3", 1.0), "double_stream_modulation_img.linear": (None, 1.0)},
     {"single": {"48": 1}}),
    ("chroma", {"double": 0.25, "single": [0, 1]},
     {"transformer_blocks.18.ff.net.2": ("double.18", 0.25), "single_transformer_blocks.1.proj_mlp": ("single.1", 1.0),
      "single_transformer_blocks.0.proj_out": ("single.0", 0.0), "distilled_guidance_layer.layers.4.linear_1": (None, 1.0)},
     {"double": {"19": 1}}),
    ("hidream", {"double": {"15": 0.3}, "single": {"0-31": 0.6}},
     {"double_stream_blocks.15.block.ff_i.experts.3.w2": ("double.15", 0.3),
      "single_stream_blocks.31.block.attn1.to_out": ("single.31", 0.6), "caption_projection.48.linear": (None, 1.0)},
     {"double": {"16": 1}}),
    ("sd3", {"joint": {"37": 0.1}},
     {"transformer_blocks.37.norm1_context.linear": ("joint.37", 0.1), "transformer_blocks.0.attn2.to_q": ("joint.0", 1.0)},
     {"joint": {"38": 1}}),
])
def test_block_weights_name_real_blocks_and_refuse_blocks_past_the_model(arch, spec, expect, past):
    bw = parse_block_weights({"transformer": spec}, arch)
    for name, (block, weight) in expect.items():
        module = loramerge.LoraModule.from_factors("transformer", name, torch.zeros(2, 1), torch.zeros(1, 2), (2, 2))
        assert block_id(arch, module) == block and bw.weight_for(module) == weight, name
    with pytest.raises(UsageError, match=rf"{re.escape(archs.spec(arch).label)} has \d+ \w+ blocks"):
        parse_block_weights({"transformer": past}, arch)


def _subset(variant, keep):
    mods = {k: m for k, m in meta_modules(variant).items() if keep(k[1])}
    arch = archs.variant_arch(variant).name
    return mods, tf.random_factors(mods, 9, ranks=(1, 2, 3), alphas=(1.0, None, 6.0),
                                   fused_groups=tf.groups(arch if arch != "hidream" else "hidream", [n for _, n in mods]))


ROUND_TRIP = {
    "flux2": ("flux2-klein-4b", lambda n: not re.search(r"blocks\.([1-9]|\d\d)\.", n)),
    "chroma": ("chroma", lambda n: not re.search(r"blocks\.([1-9]|\d\d)\.", n) and ".layers.1" not in n),
    "sd3": ("sd3.5-medium", lambda n: re.search(r"blocks\.(0|23)\.", n) or not n.startswith("transformer_blocks")),
    "hidream": ("hidream-i1", lambda n: not re.search(r"blocks\.([1-9]|\d\d)\.", n) and "projection.4" not in n),
    "flux": ("flux", lambda n: not re.search(r"blocks\.([1-9]|\d\d)\.", n)),
}


@pytest.mark.parametrize("arch", list(ROUND_TRIP))
def test_convert_between_every_pair_of_written_formats(tmp_path, arch):
    variant, keep = ROUND_TRIP[arch]
    mods, factors = _subset(variant, keep)
    tf.write_diffusers(tmp_path / "src.safetensors", factors)
    source = loramerge.load(tmp_path / "src.safetensors", arch=arch)
    assert {m.name for m in source} == {n for _, n in mods}
    gen = torch.Generator().manual_seed(0)
    probes = {m.key: torch.randn(m.in_features, generator=gen, dtype=torch.float64) for m in source}
    want = {k: probe(source[k], x) for k, x in probes.items()}
    formats = list(archs.spec(arch).formats)
    for first, second in itertools.product(formats, formats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the client notes (tested above)
            loramerge.save(source, tmp_path / "one.safetensors", format=first)
            one = loramerge.load(tmp_path / "one.safetensors")
            loramerge.save(one, tmp_path / "two.safetensors", format=second)
        two = loramerge.load(tmp_path / "two.safetensors")
        assert (one.arch, two.arch, one.format, two.format) == (arch, arch, first, second)
        assert set(two.modules) == set(want)
        for key, x in probes.items():
            assert torch.allclose(probe(two[key], x), want[key], atol=1e-5 * float(want[key].abs().max())), (first, second, key)


def test_inspect_and_analyze_run(tmp_path):
    pipe, mods, inputs, paths = client_inputs("flux2", tmp_path)
    from typer.testing import CliRunner

    from loramerge.cli import app

    result = CliRunner().invoke(app, ["inspect", str(paths[0])])
    assert result.exit_code == 0, result.output
    assert "flux2 (Flux.2)" in result.output and "transformer_blocks.1" in result.output
    result = CliRunner().invoke(app, ["analyze", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "an")])
    assert result.exit_code == 0, result.output
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert {"transformer.transformer_blocks.1", "transformer.single_transformer_blocks.1"} <= set(result["blocks"])
