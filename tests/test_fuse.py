"""Fusing into single-file checkpoints and diffusers folders, checked against diffusers' own
load_lora_weights + set_adapters + fuse_lora; extracting LoRAs from two checkpoints."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loramerge
import tiny
from loramerge.errors import ArchitectureMismatchError, LoraMergeError
from loramerge.fuse import fuse

WEIGHTS = [0.7, -0.4]
BUILDERS = {"sd1": tiny.sd15_pipeline, "sdxl": tiny.sdxl_pipeline}
COMPONENTS = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}


_WORLDS = {}


def make_world(arch, tmp_path_factory):
    """A tiny pipeline as a diffusers folder and as a single file, and two LoRAs for it."""
    if arch in _WORLDS:
        return _WORLDS[arch]
    folder = tmp_path_factory.mktemp(arch)
    pipe = BUILDERS[arch]()
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    save_file(tiny.single_file_state(pipe, arch), str(folder / "single.safetensors"))
    mods = tiny.targets(pipe, COMPONENTS[arch])
    a = tiny.random_factors(mods, rank=4, alpha=2.0, seed=1)
    b = tiny.random_factors({k: v for k, v in mods.items() if "resnets" not in k[1]}, rank=3, alpha=6.0, seed=2)
    tiny.write_kohya(folder / "a.safetensors", arch, a)
    tiny.write_diffusers(folder / "b.safetensors", b)
    _WORLDS[arch] = arch, folder, pipe, mods
    return _WORLDS[arch]


@pytest.fixture(params=["sd1", "sdxl"])
def world(request, tmp_path_factory):
    return make_world(request.param, tmp_path_factory)


@pytest.fixture
def sd1_world(tmp_path_factory):
    return make_world("sd1", tmp_path_factory)


def diffusers_fused(arch, folder, mods, dtype=torch.float32):
    """The reference: diffusers loads both LoRAs, mixes them with set_adapters and fuses."""
    pipe = BUILDERS[arch]()
    pipe.to(dtype)
    pipe.load_lora_weights(str(folder / "a.safetensors"), adapter_name="a")
    pipe.load_lora_weights(str(folder / "b.safetensors"), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=WEIGHTS)
    pipe.fuse_lora(components=list(COMPONENTS[arch]), lora_scale=1.0)
    return pipe


def compare(theirs_pipe, ours: dict, base_pipe, mods):
    """Every LoRA-touched weight within 1e-5 of diffusers (relative to the delta); every other
    weight bit-identical to the base."""
    worst = 0.0
    for (component, name), module in mods.items():
        theirs = tiny.weight_of(theirs_pipe, component, name).detach()
        base = tiny.weight_of(base_pipe, component, name).detach()
        mine = ours[(component, name)]
        err = float((mine - theirs).norm() / (theirs - base).norm())
        worst = max(worst, err)
        assert err < 1e-5, f"{component}.{name}: {err:.2e}"
    return worst


def test_fuse_single_file(world, tmp_path):
    arch, folder, pipe, mods = world
    report = fuse(folder / "single.safetensors", [folder / "a.safetensors", folder / "b.safetensors"],
                  tmp_path / "fused.safetensors", weights=WEIGHTS)
    assert report.modules == len(mods)
    fused_sd = load_file(str(tmp_path / "fused.safetensors"))
    back = tiny.from_single_file_state(fused_sd, pipe, arch)  # diffusers' own LDM converters
    ours = {}
    for (component, name) in mods:
        for key in (name + ".weight", name.removeprefix("text_model.") + ".weight"):
            if (component, key) in back:
                ours[(component, name)] = back[(component, key)]
    compare(diffusers_fused(arch, folder, mods), ours, pipe, mods)
    base_sd = load_file(str(folder / "single.safetensors"))
    touched = {k for k in base_sd if not torch.equal(base_sd[k], fused_sd[k])}
    assert len(touched) == report.tensors_touched
    assert set(base_sd) == set(fused_sd)
    if arch == "sd1":  # and the fused file loads through diffusers' from_single_file
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_single_file(str(tmp_path / "fused.safetensors"), config=str(folder / "pipe"),
                                                     subfolder="unet", local_files_only=True)
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        assert torch.equal(unet.get_submodule(name).weight, ours[("unet", name)])


def test_fuse_diffusers_folder(world, tmp_path):
    arch, folder, pipe, mods = world
    fuse(folder / "pipe", [folder / "a.safetensors", folder / "b.safetensors"], tmp_path / "fused", weights=WEIGHTS)
    ours = {}
    for component in COMPONENTS[arch]:
        files = list((tmp_path / "fused" / component).glob("*.safetensors"))
        sd = {k: v for f in files for k, v in load_file(str(f)).items()}
        for (c, name) in mods:
            if c == component:
                key = name + ".weight" if name + ".weight" in sd else name.removeprefix("text_model.") + ".weight"
                ours[(c, name)] = sd[key]
    compare(diffusers_fused(arch, folder, mods), ours, pipe, mods)
    assert (tmp_path / "fused" / "model_index.json").read_text() == (folder / "pipe" / "model_index.json").read_text()
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "fused" / vae).read_bytes() == (folder / "pipe" / vae).read_bytes()


def test_fuse_casts_once_to_the_output_dtype(sd1_world, tmp_path):
    arch, folder, pipe, mods = sd1_world
    fuse(folder / "single.safetensors", [folder / "a.safetensors", folder / "b.safetensors"],
         tmp_path / "f16.safetensors", weights=WEIGHTS, dtype="fp16")
    fuse(folder / "single.safetensors", [folder / "a.safetensors", folder / "b.safetensors"],
         tmp_path / "f32.safetensors", weights=WEIGHTS)
    f16, f32 = load_file(str(tmp_path / "f16.safetensors")), load_file(str(tmp_path / "f32.safetensors"))
    assert all(v.dtype == torch.float16 for v in f16.values())
    assert all(torch.equal(f16[k], f32[k].half()) for k in f32)  # fp32 sum, one cast


def test_extract_recovers_a_known_delta(sd1_world, tmp_path):
    arch, folder, pipe, mods = sd1_world
    gen = torch.Generator().manual_seed(3)
    tuned = load_file(str(folder / "single.safetensors"))
    truth = {}
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.output_blocks.5.0.in_layers.2.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"):
        w = tuned[key]
        delta = (torch.randn(w.shape[0], 3, generator=gen) @ torch.randn(3, w[0].numel(), generator=gen)).reshape(w.shape)
        tuned[key] = w + 0.1 * delta
        truth[key] = tuned[key] - w  # what the file actually holds, after float32 rounding
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "loramerge", "extract", "--base", str(folder / "single.safetensors"),
                           "--tuned", str(tmp_path / "tuned.safetensors"), "--rank", "3", "--dtype", "fp32",
                           "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lora = loramerge.load(tmp_path / "x.safetensors")
    assert len(lora) == 3
    names = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "model.diffusion_model.output_blocks.5.0.in_layers.2.weight": "unet.up_blocks.1.resnets.2.conv1",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight": "text_encoder.text_model.encoder.layers.1.mlp.fc1",
    }
    for key, module_key in names.items():
        got = lora[module_key].delta(torch.float64)
        assert float((got - truth[key].double()).norm() / truth[key].double().norm()) < 1e-5, module_key


def test_fuse_refuses_bad_bases_and_outputs(sd1_world, tmp_path):
    arch, folder, pipe, mods = sd1_world
    xl = tiny.sdxl_pipeline()
    save_file(tiny.single_file_state(xl, "sdxl"), str(tmp_path / "xl.safetensors"))
    with pytest.raises(ArchitectureMismatchError, match="sd1 LoRA but the base .* is sdxl"):
        fuse(tmp_path / "xl.safetensors", [folder / "a.safetensors"], tmp_path / "out.safetensors")
    unet_only = {k: v for k, v in load_file(str(folder / "single.safetensors")).items() if k.startswith("model.")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(LoraMergeError, match="the base has no text_encoder"):
        fuse(tmp_path / "unet_only.safetensors", [folder / "a.safetensors"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # a read-only output folder: one line, exit 2, nothing written
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cmd = [sys.executable, "-m", "loramerge", "fuse", "--base", str(folder / "single.safetensors"),
           "--lora", f"{folder / 'a.safetensors'}:0.5", "-o"]
    # root may write into a 0555 folder, but not into sysfs
    target = locked / "out.safetensors" if os.geteuid() != 0 else "/sys/loramerge-out.safetensors"
    proc = subprocess.run(cmd + [str(target)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not writable" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # a full disk: the file-size limit makes writes fail with EFBIG partway through
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(cmd + [str(tmp_path / "full.safetensors")], capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".full", "full"))]


def test_fuse_into_a_flux_single_file(tmp_path):
    """BFL naming: q, k, v (and the single blocks' MLP input) share one fused tensor, and the
    final modulation stores (shift, scale) where diffusers has (scale, shift)."""
    pipe = tiny.flux_pipeline()
    t = pipe.transformer
    w = lambda name: t.get_submodule(name).weight.detach().clone()  # noqa: E731
    swap = lambda x: torch.cat(list(reversed(x.chunk(2, 0))))  # noqa: E731
    double_qkv = [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    single = [f"single_transformer_blocks.1.attn.to_{x}" for x in "qkv"] + ["single_transformer_blocks.1.proj_mlp"]
    base = {
        "double_blocks.0.img_attn.qkv.weight": torch.cat([w(n) for n in double_qkv]),
        "double_blocks.0.txt_attn.proj.weight": w("transformer_blocks.0.attn.to_add_out"),
        "single_blocks.1.linear1.weight": torch.cat([w(n) for n in single]),
        "final_layer.adaLN_modulation.1.weight": swap(w("norm_out.linear")),
        # a tensor only Flux.1 has: Flux.2 spells the four above alike, and the base's
        # architecture is the one whose names the most tensors have
        "vector_in.in_layer.weight": w("time_text_embed.text_embedder.linear_1"),
    }
    save_file(base, str(tmp_path / "flux.safetensors"))
    names = double_qkv + single + ["transformer_blocks.0.attn.to_add_out", "norm_out.linear"]
    factors = tiny.random_factors({("transformer", n): t.get_submodule(n) for n in names}, rank=3, alpha=1.5, seed=9)
    tiny.write_diffusers(tmp_path / "l.safetensors", factors)
    fuse(tmp_path / "flux.safetensors", [tmp_path / "l.safetensors"], tmp_path / "out.safetensors", weights=[0.6])
    out = load_file(str(tmp_path / "out.safetensors"))
    new = {n: w(n) + 0.6 * tiny.delta_of(*factors[("transformer", n)], w(n).shape) for n in names}
    expected = {
        "double_blocks.0.img_attn.qkv.weight": torch.cat([new[n] for n in double_qkv]),
        "double_blocks.0.txt_attn.proj.weight": new["transformer_blocks.0.attn.to_add_out"],
        "single_blocks.1.linear1.weight": torch.cat([new[n] for n in single]),
        "final_layer.adaLN_modulation.1.weight": swap(new["norm_out.linear"]),
    }
    for key, value in expected.items():
        assert torch.allclose(out[key], value, atol=1e-6), key


def test_fuse_sharded_folder_with_dtype_change(sd1_world, tmp_path):
    """A diffusers folder whose UNet is sharded: every shard streamed, the index kept (its
    total size updated for the new dtype), and diffusers loads the result."""
    arch, folder, pipe, mods = sd1_world
    sharded = tmp_path / "sharded"
    shutil.copytree(folder / "pipe", sharded)
    shutil.rmtree(sharded / "unet")
    pipe.unet.save_pretrained(sharded / "unet", max_shard_size="300KB", safe_serialization=True)
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    fuse(sharded, [folder / "a.safetensors", folder / "b.safetensors"], tmp_path / "out", weights=WEIGHTS, dtype="bf16")
    from diffusers import UNet2DConditionModel

    shards = sorted((tmp_path / "out" / "unet").glob("*.safetensors"))
    for shard in shards:
        assert {load_file(str(shard))[k].dtype for k in load_file(str(shard))} == {torch.bfloat16}
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet", local_files_only=True,
                                                torch_dtype=torch.bfloat16)
    reference = diffusers_fused(arch, folder, mods)
    name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
    ours = unet.get_submodule(name).weight.float()
    theirs = reference.unet.get_submodule(name).weight.detach()
    assert torch.allclose(ours, theirs, rtol=2 ** -8, atol=0)  # the fp32 result, rounded once to bf16
    index = json.loads(next((tmp_path / "out" / "unet").glob("*.index.json")).read_text())
    total = sum(f.stat().st_size for f in (tmp_path / "out" / "unet").glob("*.safetensors"))
    assert 0 < index["metadata"]["total_size"] < total
