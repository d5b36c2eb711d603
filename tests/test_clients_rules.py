"""`check` for the clients that cannot run here (ComfyUI, A1111, Forge): hand-built files whose
outcome their loaders' code determines (docs/notes/clients.md, with the source lines restated
there), bad input, the command line, and what the writers do for those clients."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loramerge
from loramerge import clients
from loramerge.clients import a1111
from loramerge.errors import ClientWarning

G = torch.Generator().manual_seed(0)
HEADER = {"sd1": {"ss_base_model_version": "sd_v1"}, "sd2": {"ss_base_model_version": "sd_v2"},
          "sdxl": {"ss_base_model_version": "sdxl_base_v1-0"}, "sd3": {"ss_base_model_version": "sd3"},
          "flux": {"ss_base_model_version": "flux1"}}


def rnd(*shape):
    return torch.randn(*shape, generator=G)


def lora(key, out=8, rank=2, inp=8, alpha=None, up=".lora_up.weight", down=".lora_down.weight"):
    t = {key + up: rnd(out, rank), key + down: rnd(rank, inp)}
    if alpha is not None:
        t[key + ".alpha"] = torch.tensor(float(alpha))
    return t


def write(tmp_path, name, arch, *parts, header=None):
    tensors = {}
    for p in parts:
        tensors.update(p)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={**HEADER[arch], **(header or {})})
    return path


def verdicts(path, **kw):
    return {v.client: v for v in clients.check(path, **kw).verdicts}


Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"


def test_comfyui_and_forge_key_spellings(tmp_path):
    """ComfyUI maps kohya names (sgm and diffusers), `diffusion_model.` + sgm, and dotted
    diffusers names only in the old processor spelling; Forge the same but not PEFT's
    `.default.` adapter spelling. PEFT names of attention projections match nothing there."""
    path = write(tmp_path, "spellings", "sd1",
                 lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k", alpha=1),
                 lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v", alpha=4),
                 lora("diffusion_model.input_blocks.4.1.proj_in", up=".lora_B.weight", down=".lora_A.weight"),
                 lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out",
                      up="_lora.up.weight", down="_lora.down.weight"),
                 lora(f"unet.{FF}", up=".lora_B.default.weight", down=".lora_A.default.weight"))
    v = verdicts(path)
    assert v["comfyui"].exact, clients.format_report(clients.check(path))
    assert set(v["forge"].lost) == {f"unet.{FF}"} and v["forge"].outcome == "loaded"
    assert len(v["forge"].ignored_keys) == 2
    # A1111: kohya names only (the module key is the text before the first '.')
    assert set(v["a1111"].lost) == {"unet.down_blocks.1.attentions.0.proj_in", f"unet.{FF}",
                                    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"}

    peft = write(tmp_path, "peft", "sd1", lora(f"unet.{Q}", up=".lora_B.weight", down=".lora_A.weight"),
                 lora(f"unet.{FF}", up=".lora_B.weight", down=".lora_A.weight"))
    v = verdicts(peft)
    assert list(v["comfyui"].lost) == [f"unet.{Q}"]  # no candidate for unet.….attn1.to_q
    assert v["comfyui"].ignored_keys == [f"unet.{Q}.lora_A.weight", f"unet.{Q}.lora_B.weight"]
    assert v["diffusers"].exact and len(v["a1111"].lost) == 2


def test_alpha_placement_and_metadata_scales(tmp_path):
    """ComfyUI/A1111/Forge take a module's `.alpha` key (alpha / rows of down) or scale 1; they
    never read lora_adapter_metadata, so a PEFT file whose alphas live there is applied at
    scale 1 (diffusers reads it)."""
    kohya = write(tmp_path, "kohya", "sd1", lora(f"lora_unet_{FF.replace('.', '_')}", rank=4, alpha=2),
                  lora(f"lora_unet_{Q.replace('.', '_')}", rank=4))
    v = verdicts(kohya)
    assert v["comfyui"].exact and v["a1111"].exact and v["forge"].exact
    # diffusers gives a module without alpha the most common alpha of the others (2), not its rank
    assert v["diffusers"].scales == {f"unet.{Q}": (1.0, 0.5)}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [FF]}
    peft = write(tmp_path, "meta", "sd1", lora(f"unet.{FF}", rank=4, up=".lora_B.weight", down=".lora_A.weight"),
                 header={"lora_adapter_metadata": json.dumps(meta)})
    v = verdicts(peft)
    assert v["diffusers"].exact
    assert v["comfyui"].scales == {f"unet.{FF}": (2.0, 1.0)} and v["forge"].scales == {f"unet.{FF}": (2.0, 1.0)}


def test_forge_ignores_the_whole_file_beyond_12_unused_keys(tmp_path):
    """Forge: 12 unused keys are reported and the rest loads; 13 and the file is skipped."""
    kohya = lora(f"lora_unet_{FF.replace('.', '_')}", alpha=1)
    unmatched = [lora(f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn{a}.to_{x}",
                      up=".lora_B.weight", down=".lora_A.weight") for a in (1, 2) for x in "qkv"]
    twelve = write(tmp_path, "twelve", "sd1", kohya, *unmatched)
    v = verdicts(twelve)
    assert v["forge"].outcome == "loaded" and len(v["forge"].ignored_keys) == 12 and len(v["forge"].lost) == 6
    one_more = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(2.0)}
    v = verdicts(write(tmp_path, "thirteen", "sd1", kohya, *unmatched, one_more))
    assert v["forge"].outcome == "ignored" and len(v["forge"].lost) == 7
    assert "13 keys" in v["forge"].message
    assert v["comfyui"].outcome == "loaded" and len(v["comfyui"].lost) == 6  # ComfyUI logs and goes on


def test_a1111_applies_openclip_attention_only_with_all_four(tmp_path):
    """SD2's text encoder (and SDXL's second): A1111 applies a layer's q, k, v, out together or
    not at all; ComfyUI and Forge apply each. loramerge's kohya writer completes the layer with
    zero modules, so the written file is exact in A1111 and means the same ΔW."""
    te = "lora_te_text_model_encoder_layers_{}_self_attn_{}_proj"
    path = write(tmp_path, "partial", "sd2", *(lora(te.format(0, x), alpha=1) for x in ("q", "k", "v")),
                 *(lora(te.format(1, x), alpha=1) for x in ("q", "k", "v", "out")),
                 lora("lora_te_text_model_encoder_layers_0_mlp_fc1", alpha=1),
                 lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", inp=1024, alpha=1))
    v = verdicts(path)
    assert set(v["a1111"].lost) == {f"text_encoder.text_model.encoder.layers.0.self_attn.{x}_proj" for x in "qkv"}
    assert "all of q, k, v, out" in next(iter(v["a1111"].lost.values()))
    assert v["comfyui"].exact and v["forge"].exact and v["diffusers"].exact

    original = loramerge.load(path)
    loramerge.save(original, tmp_path / "out.safetensors")
    assert clients.check(tmp_path / "out.safetensors").exact
    back = loramerge.load(tmp_path / "out.safetensors")
    added = set(back.modules) - set(original.modules)
    assert added == {"text_encoder.text_model.encoder.layers.0.self_attn.out_proj"}
    assert float(back[next(iter(added))].delta().abs().max()) == 0.0
    for key, m in original.modules.items():
        assert torch.allclose(back[key].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["ss_v2"] == "True" and header["ss_base_model_version"] == "sd_v2"  # A1111/Forge list it as SD2
    assert "lora_adapter_metadata" not in header


def test_a1111_sdxl_conversions_and_module_types(tmp_path):
    """A1111 converts kohya diffusers-named SDXL keys with SD1's block layout: up block 0's
    upsampler and add_embedding reach no module; the text projection has no spelling at all.
    Each matched module's parameters must fit a module type, else the whole file fails."""
    path = write(tmp_path, "xl", "sdxl", lora("lora_unet_up_blocks_0_upsamplers_0_conv", alpha=1),
                 lora("lora_unet_up_blocks_1_upsamplers_0_conv", alpha=1),
                 lora("lora_unet_add_embedding_linear_1", alpha=1),
                 lora("lora_unet_time_embedding_linear_1", alpha=1))
    v = verdicts(path)
    assert set(v["a1111"].lost) == {"unet.up_blocks.0.upsamplers.0.conv", "unet.add_embedding.linear_1"}
    assert v["comfyui"].exact and v["forge"].exact
    assert set(v["diffusers"].lost) == {"unet.add_embedding.linear_1"}  # "add.embedding.linear": no module
    v = verdicts(write(tmp_path, "proj", "sdxl", lora("lora_te2_text_projection", alpha=1),
                       lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", alpha=1)))
    assert list(v["a1111"].lost) == ["text_encoder_2.text_projection"] and v["comfyui"].exact and v["forge"].exact
    assert a1111.to_compvis("lora_unet_up_blocks_1_upsamplers_0_conv", False) == "diffusion_model_output_blocks_5_2_conv"
    accepts = a1111.A1111.accepts
    assert accepts({"lora_up.weight", "lora_down.weight", "alpha", "diff_b"})
    assert accepts({"diff", "diff_b"}) and accepts({"lokr_w1", "lokr_w2_a", "lokr_w2_b"})
    assert not accepts({"diff_b"}) and not accepts({"lora_up.weight", "alpha"})


def test_dit_clients(tmp_path):
    """SD3: Forge maps only sd-scripts names, ComfyUI both, diffusers only PEFT names. Flux:
    ComfyUI applies diffusers' split q/k/v as row slices of the fused weight, and a bias delta
    on such a slice is lost ("NOT LOADED"); on an unfused module it is applied."""
    sd3 = write(tmp_path, "sd3", "sd3", lora("lora_unet_joint_blocks_0_x_block_attn_qkv", out=24, alpha=1),
                lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", alpha=1))
    v = verdicts(sd3)
    assert v["comfyui"].exact and v["forge"].exact and v["a1111"].outcome == "unsupported"
    assert len(v["diffusers"].lost) == 4
    peft = write(tmp_path, "sd3p", "sd3", lora("transformer.transformer_blocks.0.attn.to_q", up=".lora_B.weight",
                                                down=".lora_A.weight"))
    v = verdicts(peft)
    assert v["comfyui"].exact and v["diffusers"].exact and v["forge"].lost

    t = "transformer.transformer_blocks.0.attn.to_q"
    flux = write(tmp_path, "flux", "flux", lora(t, up=".lora_B.weight", down=".lora_A.weight"), {f"{t}.diff_b": rnd(8)},
                 lora("transformer.proj_out", up=".lora_B.weight", down=".lora_A.weight"),
                 {"transformer.proj_out.diff_b": rnd(8)})
    v = verdicts(flux, clients=["comfyui"])["comfyui"]
    assert v.bias_lost == [f"{t}"] and not v.lost and not v.scales


def run(*args):
    """The command line in this process (the installed entry point is run once, below)."""
    from typer.testing import CliRunner

    from loramerge.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_check_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loramerge", "check", tmp_path / "nothing.safetensors"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing.safetensors'}: no such file"]


@pytest.mark.parametrize("args, needle", [
    (["nothing.safetensors"], "nothing.safetensors"),
    (["{bad}"], "bad.safetensors"),
    (["{good}", "--client", "photoshop"], "photoshop"),
    (["{good}", "--fix"], "-o"),
    (["{good}", "-o", "{out}"], "--fix"),
])
def test_check_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    good = write(tmp_path, "good", "sd1", lora(f"lora_unet_{FF.replace('.', '_')}", alpha=1))
    args = [a.format(bad=tmp_path / "bad.safetensors", good=good, out=tmp_path / "o.safetensors") for a in args]
    code, _, err = run("check", *args)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("kind, tensors", [
    ("ia3", {".weight": torch.full((320,), 0.1), ".on_input": torch.tensor(False)}),
    ("oft", {".oft_blocks": torch.full((4, 80, 80), 0.01), ".alpha": torch.tensor(0.0)}),
])
def test_check_says_what_it_does_not_model(tmp_path, kind, tensors):
    """LyCORIS IA3 and OFT files (read, applied given a base): check restates no client's handling
    of them, so every client is 'unknown' (exit 1), never an internal error."""
    key = "lora_unet_" + Q.replace(".", "_")
    path = write(tmp_path, kind, "sd1", {key + suffix: t for suffix, t in tensors.items()})
    found = verdicts(path)
    assert {v.outcome for v in found.values()} == {"unknown"}
    assert all(f"applies {kind} modules is not modelled" in v.message for v in found.values())
    code, out, err = run("check", path)
    assert code == 1 and err == "" and "unknown" in out

def test_check_command_exit_codes_json_fix_and_inspect(tmp_path):
    peft = write(tmp_path, "peft", "sd1", lora(f"unet.{Q}", up=".lora_B.weight", down=".lora_A.weight"),
                 lora(f"unet.{FF}", up=".lora_B.weight", down=".lora_A.weight"))
    code, out, _ = run("check", peft)
    assert code == 1 and "✗ ComfyUI" in out and "✓ diffusers" in out
    code, out, _ = run("check", peft, "--client", "diffusers", "--json")
    assert code == 0 and json.loads(out)["clients"]["diffusers"]["exact"] is True
    code, _, err = run("check", peft, "--fix", "-o", tmp_path / "fixed.safetensors")
    assert code == 0 and "kohya" in err
    code, out, _ = run("check", tmp_path / "fixed.safetensors", "--json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "kohya" and all(c["exact"] for c in report["clients"].values())
    before, after = loramerge.load(peft), loramerge.load(tmp_path / "fixed.safetensors")
    for key, m in before.modules.items():
        assert torch.allclose(after[key].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    code, out, _ = run("inspect", tmp_path / "fixed.safetensors", "--no-norms")
    assert code == 0 and "clients       diffusers ✓, comfyui ✓, a1111 ✓, forge ✓" in out

    sd3 = write(tmp_path, "sd3", "sd3", lora("transformer.transformer_blocks.0.attn.to_q", up=".lora_B.weight",
                                              down=".lora_A.weight"))
    code, _, err = run("check", sd3, "--client", "diffusers,forge", "--fix", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "diffusers and Forge" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run("check", sd3, "--client", "forge", "--fix", "-o", tmp_path / "f.safetensors")
    assert code == 0 and "kohya" in err


def test_writers_warn_naming_the_client_and_the_format_that_loads(tmp_path):
    """Writing a format some client cannot load exactly gives one warning line naming the client
    and the alternative, derived from check on the tensors written; the default format of SD1
    gives none. On the command line it is one `warning:` line."""
    path = write(tmp_path, "in", "sd1", lora(f"lora_unet_{Q.replace('.', '_')}", alpha=1),
                 lora(f"lora_unet_{FF.replace('.', '_')}", alpha=2))
    lora_ = loramerge.load(path)
    with pytest.warns(ClientWarning) as caught:
        loramerge.save(lora_, tmp_path / "d.safetensors", format="diffusers")
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "ComfyUI" in text and "A1111" in text and "Forge" in text and "--format kohya" in text
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientWarning)
        loramerge.save(lora_, tmp_path / "k.safetensors")
    code, _, err = run("convert", path, "--format", "diffusers", "-o", tmp_path / "c.safetensors")
    assert code == 0 and [x for x in err.splitlines() if x.startswith("warning:")] == [f"warning: c.safetensors in "
                                                                                       f"diffusers format: {text.split(': ', 1)[1]}"]

    bias = write(tmp_path, "bias", "sd1", lora(f"lora_unet_{FF.replace('.', '_')}", alpha=1),
                 {f"lora_unet_{FF.replace('.', '_')}.diff_b": rnd(8)})
    with pytest.warns(ClientWarning, match=r"^k\.safetensors in kohya format: diffusers: rejected: .*diff_b.*"
                                           r"\(--format diffusers loads exactly there\)"):
        loramerge.save(loramerge.load(bias), tmp_path / "k.safetensors")
    flux = write(tmp_path, "flux", "flux", lora("lora_unet_img_in", out=8, inp=4, alpha=1),
                 lora("lora_unet_double_blocks_0_img_attn_proj", alpha=1))
    with pytest.warns(ClientWarning, match=r"diffusers: 1 of 2 modules lost.*--format diffusers loads exactly there"):
        loramerge.save(loramerge.load(flux), tmp_path / "fk.safetensors", format="kohya")


def test_kohya_fold_by_powers_of_two_is_bit_exact_in_fp16(tmp_path):
    """One alpha per kohya file: each module's up factor is multiplied by its alpha / the file's
    alpha. fp16 inputs with alphas 8, 4, 16 (powers of two apart) and 3 written as fp16: the
    first three keep every bit up to the exponent (× a power of two), down untouched; the fourth
    is rounded once (relative error ≤ fp16's half ulp)."""
    names = [f"lora_unet_down_blocks_{b}_attentions_0_transformer_blocks_0_attn1_to_{x}" for b, x in
             ((0, "q"), (0, "k"), (1, "q"), (1, "k"))]
    alphas = [8.0, 4.0, 16.0, 3.0]
    tensors = {}
    for name, alpha in zip(names, alphas):
        tensors.update({k: v.half() for k, v in lora(name, rank=4, alpha=alpha).items()})
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src), metadata=HEADER["sd1"])
    loramerge.save(loramerge.load(src), tmp_path / "out.safetensors", dtype="fp16")
    out = load_file(str(tmp_path / "out.safetensors"))
    file_alpha = {float(out[f"{n}.alpha"]) for n in names}
    assert len(file_alpha) == 1
    A = file_alpha.pop()
    for name, alpha in zip(names, alphas):
        up_in, up_out = tensors[f"{name}.lora_up.weight"], out[f"{name}.lora_up.weight"]
        assert up_out.dtype == torch.float16 and torch.equal(out[f"{name}.lora_down.weight"], tensors[f"{name}.lora_down.weight"])
        ratio = alpha / A
        if ratio in (0.25, 0.5, 1.0, 2.0, 4.0):
            assert torch.equal(up_out.float(), up_in.float() * ratio), name
        else:
            err = ((up_out.float() - up_in.float() * ratio).abs() / (up_in.float() * ratio).abs()).max()
            assert 0 < float(err) <= 2 ** -11, name


def test_peft_metadata_agrees_with_the_tensors(tmp_path):
    """diffusers-format files: scales folded (alpha = rank), lora_adapter_metadata's ranks,
    patterns and targets those of the tensors, no `.alpha` keys; a denoiser pattern key that is
    a suffix of another module's path is anchored."""
    path = write(tmp_path, "flux", "flux", lora("transformer.proj_out", rank=3, alpha=1.5, up=".lora_B.weight",
                                                 down=".lora_A.weight"),
                 *(lora(f"transformer.single_transformer_blocks.{i}.proj_out", rank=2, alpha=4, up=".lora_B.weight",
                        down=".lora_A.weight") for i in range(3)))
    original = loramerge.load(path)
    loramerge.save(original, tmp_path / "d.safetensors", format="diffusers")
    tensors = load_file(str(tmp_path / "d.safetensors"))
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert not [k for k in tensors if k.endswith(".alpha")]
    ranks = {k[len("transformer."):-len(".lora_A.weight")]: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert meta["transformer.r"] == meta["transformer.lora_alpha"] == 2
    assert meta["transformer.rank_pattern"] == meta["transformer.alpha_pattern"] == {"^proj_out": 3}
    assert sorted(meta["transformer.target_modules"]) == sorted(ranks)
    back = loramerge.load(tmp_path / "d.safetensors")
    for key, m in original.modules.items():
        assert back[key].scale == 1.0 and torch.allclose(back[key].delta(), m.delta(), rtol=1e-6, atol=1e-7)
