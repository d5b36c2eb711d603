"""Module kinds beyond plain LoRA — bias deltas, norm-weight deltas, DoRA, IA3, OFT/BOFT, GLoRA —
fused, attached and merged (against a base where their change depends on it); each checked
against diffusers/PEFT's or LyCORIS's own construction of the weight, or the formula written out
here in float64. T-LoRA and PEFT's IA3 are refused naming the module; fuse refuses what it
cannot write exactly (fp16 overflow, integer and NaN base tensors)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loramerge
import tiny
from loramerge.errors import LoraMergeError, NonFiniteError, UnsupportedModuleError
from loramerge.fuse import fuse

SD1 = {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"}
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 pipeline as a diffusers folder and as an LDM single file."""
    folder = tmp_path_factory.mktemp("kinds")
    pipe = tiny.sd15_pipeline()
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    save_file(tiny.single_file_state(pipe, "sd1"), str(folder / "single.safetensors"))
    return folder, pipe


def layer(pipe, component, name):
    model = getattr(pipe, component)
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("text_model."))


def param(pipe, component, name, part="weight"):
    module = layer(pipe, component, name)
    module = getattr(module, "base_layer", module)
    return getattr(module, part).detach().clone()


def folder_params(out, component) -> dict:
    sd = {}
    for f in (out / component).glob("*.safetensors"):
        sd.update(load_file(str(f)))
    return sd


def folder_param(sd, name, part="weight"):
    return sd.get(f"{name}.{part}", sd.get(f"{name.removeprefix('text_model.')}.{part}"))


def single_params(path, pipe) -> dict:
    """A fused single file read back with diffusers' own LDM converters."""
    return tiny.from_single_file_state(load_file(str(path)), pipe, "sd1")


def single_param(single, component, name, part="weight"):
    return single.get((component, f"{name}.{part}"), single.get((component, f"{name.removeprefix('text_model.')}.{part}")))


def rel(ours, theirs, base):
    return float((ours.double() - theirs.double()).norm() / (theirs.double() - base.double()).norm())


def kohya(component, name):
    return tiny.kohya_key("sd1", component, name)


def fuse_everywhere(world, loras: dict, weights: dict, tmp_path):
    """``loras`` ({name: file}) fused into the folder and into the single file, and attached to a
    fresh pipeline and fused there: (fused folder, single file read back, the mix, its pipeline,
    that pipeline's original parameters)."""
    folder, pipe = world
    files, ws = list(loras.values()), [weights[n] for n in loras]
    fuse(folder / "pipe", files, tmp_path / "fused", weights=ws)
    fuse(folder / "single.safetensors", files, tmp_path / "fused.safetensors", weights=ws)
    mix_pipe = tiny.sd15_pipeline()
    original = snapshot(mix_pipe)
    mix = loramerge.attach(mix_pipe, loras)
    mix.set_weights(weights)
    mix.fuse()
    return tmp_path / "fused", single_params(tmp_path / "fused.safetensors", pipe), mix, mix_pipe, original


def snapshot(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


# --------------------------------------------------------------------------------------------
# 1. bias deltas: PEFT lora_B.bias and LyCORIS diff_b


def with_bias(component, name) -> bool:
    """diffusers' attention projections have no bias; every other targeted layer has one."""
    return not name.endswith(("to_q", "to_k", "to_v"))


def peft_file(path, factors, flag):
    """diffusers keys, alphas in lora_adapter_metadata with ``flag`` (lora_bias, use_dora) set,
    as diffusers writes them: (its tensors, its header)."""
    tiny.write_diffusers(path, factors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    config.update({f"{component}.{flag}": True for component, _ in factors})
    return load_file(str(path)), {**meta, "lora_adapter_metadata": json.dumps(config)}


def write_peft_with_bias(path, factors, seed):
    """diffusers keys with PEFT's lora_B.bias (lora_bias=True)."""
    sd, meta = peft_file(path, factors, "lora_bias")
    gen = torch.Generator().manual_seed(seed)
    for (component, name), (up, _, _) in factors.items():
        sd[f"{component}.{name}.lora_B.bias"] = torch.randn(up.shape[0], generator=gen) * 0.3
    save_file(sd, str(path), metadata=meta)
    return sd


def test_bias_deltas_fuse_and_attach_like_diffusers(world, tmp_path):
    folder, pipe = world
    mods = tiny.targets(pipe, ("unet", "text_encoder"))
    # PEFT cannot merge lora_bias into a layer without a bias (diffusers' q, k, v): a has none there
    a = tiny.random_factors({k: v for k, v in mods.items() if with_bias(*k)}, rank=4, alpha=2.0, seed=1)
    b = tiny.random_factors({k: v for k, v in mods.items() if "attentions" in k[1]}, rank=3, alpha=6.0, seed=2)
    write_peft_with_bias(tmp_path / "a.safetensors", a, seed=3)
    tiny.write_kohya(tmp_path / "b.safetensors", "sd1", b)  # no bias: only a's counts
    weights = [0.7, -0.4]
    ref = tiny.sd15_pipeline()
    ref.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    ref.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=weights)
    ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    ff = Q.replace("attn1.to_q", "ff.net.2")
    assert not torch.equal(param(ref, "unet", ff, "bias"), param(pipe, "unet", ff, "bias"))  # diffusers moved it

    loras = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    _, single, mix, mix_pipe, original = fuse_everywhere(world, loras, dict(zip("ab", weights)), tmp_path)
    for component in ("unet", "text_encoder"):
        sd = folder_params(tmp_path / "fused", component)
        for (c, name) in a:
            if c != component:
                continue
            for part in ("weight", "bias"):
                theirs, base = param(ref, c, name, part), param(pipe, c, name, part)
                got = {"folder": folder_param(sd, name, part), "single": single_param(single, c, name, part),
                       "attach": param(mix_pipe, c, name, part)}
                for where, ours in got.items():
                    assert rel(ours, theirs, base) < 1e-5, f"{where} {c}.{name}.{part}"
    mix.unfuse()
    assert all(torch.equal(original[k], v) for k, v in snapshot(mix_pipe).items())  # biases restored too


def test_bias_rows_of_fused_tensors_and_written_fused_biases(tmp_path):
    """OpenCLIP's in_proj_bias (SDXL single file) takes q and v's bias deltas in their rows; a
    kohya Flux file writes the bias of a fused qkv with zeros for the member without one."""
    pipe = tiny.sdxl_pipeline()
    save_file(tiny.single_file_state(pipe, "sdxl"), str(tmp_path / "xl.safetensors"))
    names = [f"text_model.encoder.layers.1.self_attn.{x}_proj" for x in "qv"]
    gen = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    for name in names:
        key = tiny.kohya_key("sdxl", "text_encoder_2", name)
        up, down, diff_b = torch.randn(32, 2, generator=gen), torch.randn(2, 32, generator=gen), torch.randn(32, generator=gen)
        sd |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(1.0),
               f"{key}.diff_b": diff_b}
        base = param(pipe, "text_encoder_2", name, "bias").double()
        expected[name] = base + 0.5 * diff_b.double()
    save_file(sd, str(tmp_path / "l.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    fuse(tmp_path / "xl.safetensors", [tmp_path / "l.safetensors"], tmp_path / "out.safetensors", weights=[0.5])
    back = tiny.from_single_file_state(load_file(str(tmp_path / "out.safetensors")), pipe, "sdxl")
    for name in names:
        got = single_param(back, "text_encoder_2", name, "bias")
        assert torch.allclose(got.double(), expected[name], atol=1e-6), name
    k_bias = single_param(back, "text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj", "bias")
    assert torch.equal(k_bias, param(pipe, "text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj", "bias"))

    # Flux: to_q and to_k with bias deltas, written as one kohya qkv, read back member by member
    mods = {}
    for x in "qk":
        n = f"transformer.transformer_blocks.0.attn.to_{x}"
        mods[n] = torch.randn(3072, generator=gen)
        sd = {f"{n}.lora_A.weight": torch.randn(2, 3072, generator=gen), f"{n}.lora_B.weight": torch.randn(3072, 2, generator=gen),
              f"{n}.lora_B.bias": mods[n]}
        # attention-only 3072-wide modules fit Flux.1, Chroma and Qwen-Image alike: the header decides
        save_file(sd, str(tmp_path / f"{x}.safetensors"), metadata={"ss_base_model_version": "flux1"})
    merged = loramerge.merge([tmp_path / "q.safetensors", tmp_path / "k.safetensors"], [1.0, 0.5], device="cpu")
    loramerge.save(merged, tmp_path / "qk.safetensors", format="kohya")
    raw = load_file(str(tmp_path / "qk.safetensors"))
    assert raw["lora_unet_double_blocks_0_img_attn_qkv.diff_b"][2 * 3072:].abs().max() == 0  # v: none
    back = loramerge.load(tmp_path / "qk.safetensors")
    assert torch.allclose(back["transformer.transformer_blocks.0.attn.to_q"].bias_delta(), mods[f"transformer.transformer_blocks.0.attn.to_q"])
    assert torch.allclose(back["transformer.transformer_blocks.0.attn.to_k"].bias_delta(), 0.5 * mods[f"transformer.transformer_blocks.0.attn.to_k"])
    assert "transformer.transformer_blocks.0.attn.to_v" not in back


# --------------------------------------------------------------------------------------------
# 2. norm-weight deltas (LyCORIS full `diff` on a norm, and `w_norm`/`b_norm`)

NORMS = {("unet", "down_blocks.0.resnets.0.norm1"): "diff", ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.norm1"): "w_norm",
         ("text_encoder", "text_model.encoder.layers.0.layer_norm1"): "diff"}


def norm_file(path, pipe, seed, only=None):
    gen = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for (component, name), style in NORMS.items():
        if only and name not in only:
            continue
        n = param(pipe, component, name).shape[0]
        w, b = torch.randn(n, generator=gen) * 0.1, torch.randn(n, generator=gen) * 0.1
        key = kohya(component, name)
        sd[f"{key}.{style}"], sd[f"{key}.{'diff_b' if style == 'diff' else 'b_norm'}"] = w, b
        deltas[(component, name)] = (w.double(), b.double())
    up, down = torch.randn(32, 2, generator=gen), torch.randn(2, 32, generator=gen)  # and one LoRA module
    sd |= {f"{kohya('unet', Q)}.lora_up.weight": up, f"{kohya('unet', Q)}.lora_down.weight": down}
    save_file(sd, str(path), metadata=SD1)
    return deltas


def test_norm_weight_deltas(world, tmp_path):
    folder, pipe = world
    da = norm_file(tmp_path / "a.safetensors", pipe, 1)
    db = norm_file(tmp_path / "b.safetensors", pipe, 2, only={"down_blocks.0.resnets.0.norm1"})  # one module in one input only
    a = loramerge.load(tmp_path / "a.safetensors")
    assert {m.kind for m in a if m.is_vector} == {"norm"} and len(a) == 4
    weights = [0.8, -0.5]
    expected = {}
    for key, (w, b) in da.items():
        total_w, total_b = weights[0] * w, weights[0] * b
        if key in db:
            total_w, total_b = total_w + weights[1] * db[key][0], total_b + weights[1] * db[key][1]
        expected[key] = (param(pipe, *key).double() + total_w, param(pipe, *key, "bias").double() + total_b)
    loras = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    _, single, mix, mix_pipe, original = fuse_everywhere(world, dict(zip("ab", loras)), dict(zip("ab", weights)), tmp_path)
    for linear in ("linear", "ties"):  # vectors merge linearly whatever the method
        merged = loramerge.merge(loras, weights, method=linear, device="cpu")
        loramerge.save(merged, tmp_path / f"{linear}.safetensors")
        back = loramerge.load(tmp_path / f"{linear}.safetensors")
        for (component, name), (w_exp, b_exp) in expected.items():
            m = back[f"{component}.{name}"]
            assert m.kind == "norm"
            assert torch.allclose(m.delta(torch.float64), w_exp - param(pipe, component, name).double(), atol=1e-6)
            assert torch.allclose(m.bias_delta(torch.float64), b_exp - param(pipe, component, name, "bias").double(), atol=1e-6)
    for (component, name), (w_exp, b_exp) in expected.items():
        sd = folder_params(tmp_path / "fused", component)
        for part, exp in (("weight", w_exp), ("bias", b_exp)):
            for where, got in (("folder", folder_param(sd, name, part)), ("attach", param(mix_pipe, component, name, part)),
                               ("single", single_param(single, component, name, part))):
                assert torch.allclose(got.double(), exp, atol=1e-6), f"{where} {component}.{name}.{part}"
    mix.unfuse()
    assert all(torch.equal(original[k], v) for k, v in snapshot(mix_pipe).items())
    raw = load_file(str(tmp_path / "linear.safetensors"))
    assert f"{kohya('unet', 'down_blocks.0.resnets.0.norm1')}.diff" in raw  # kohya-style: LyCORIS full keys
    with pytest.warns(UserWarning, match="cannot carry norm-weight deltas: 3 dropped"):
        loramerge.save(a, tmp_path / "d.safetensors", format="diffusers")
    assert len(loramerge.load(tmp_path / "d.safetensors")) == 1


# --------------------------------------------------------------------------------------------
# 3. DoRA


def peft_dora_file(path, pipe, mods, seed):
    factors = tiny.random_factors(mods, rank=4, alpha=8.0, seed=seed)
    sd, meta = peft_file(path, factors, "use_dora")
    gen = torch.Generator().manual_seed(seed + 100)
    for (component, name), module in mods.items():
        w = module.weight.detach()
        mag = w.reshape(w.shape[0], -1).norm(dim=1) * (1 + 0.2 * torch.rand(w.shape[0], generator=gen))
        sd[f"{component}.{name}.lora_magnitude_vector"] = mag if w.dim() == 2 else mag.reshape(1, -1, 1, 1)
    save_file(sd, str(path), metadata=meta)
    return factors


def test_peft_dora_fuses_and_attaches_like_diffusers(world, tmp_path):
    folder, pipe = world
    # Linear layers: diffusers 0.42 does not load a conv's magnitude (reports it unexpected; next test)
    mods = {k: v for k, v in tiny.targets(pipe, ("unet",)).items()
            if "down_blocks.0" in k[1] and isinstance(v, torch.nn.Linear)}
    peft_dora_file(tmp_path / "dora.safetensors", pipe, mods, seed=4)
    ref = tiny.sd15_pipeline()
    ref.load_lora_weights(str(tmp_path / "dora.safetensors"), adapter_name="d")
    magnitude = load_file(str(tmp_path / "dora.safetensors"))[f"unet.{Q}.lora_magnitude_vector"]
    assert torch.equal(layer(ref, "unet", Q).lora_magnitude_vector["d"].weight, magnitude)  # it is loaded
    ref.fuse_lora(components=["unet"], lora_scale=1.0)
    lora = loramerge.load(tmp_path / "dora.safetensors", arch="sd1")
    assert {m.kind for m in lora} == {"lora+dora"}
    with pytest.raises(UnsupportedModuleError, match=r"is DoRA \(LoRA\).*--base"):
        loramerge.merge([lora], device="cpu")
    fuse(folder / "pipe", [tmp_path / "dora.safetensors"], tmp_path / "fused")
    fuse(folder / "single.safetensors", [tmp_path / "dora.safetensors"], tmp_path / "f.safetensors", dtype="fp16")
    single = single_params(tmp_path / "f.safetensors", pipe)
    mix_pipe = tiny.sd15_pipeline()
    mix_pipe.unet.half()
    original = snapshot(mix_pipe)
    mix = loramerge.attach(mix_pipe, {"d": tmp_path / "dora.safetensors"})
    mix.fuse()
    sd = folder_params(tmp_path / "fused", "unet")
    for (_, name) in mods:
        theirs, base = param(ref, "unet", name), param(pipe, "unet", name)
        assert rel(folder_param(sd, name), theirs, base) < 1e-5, name
        half = theirs.half().float()  # the fp32 result rounded once (ours and theirs differ by ~1e-7)
        for ours in (single[("unet", name + ".weight")].float(), param(mix_pipe, "unet", name).float()):
            assert (ours - half).abs().max() <= half_ulp(half), name
    mix.set_weights({"d": 0.6})  # a weight scales W' − W (ComfyUI's strength)
    for (_, name) in list(mods)[:3]:
        theirs, base = param(ref, "unet", name).double(), param(pipe, "unet", name).double()
        expected = (base + 0.6 * (theirs - base)).half().float()
        assert (param(mix_pipe, "unet", name).float() - expected).abs().max() <= 2 * half_ulp(expected), name
    mix.unfuse()
    assert all(torch.equal(original[k], v) for k, v in snapshot(mix_pipe).items())


def test_peft_dora_on_a_conv_is_normalised_per_output_channel(world, tmp_path):
    """PEFT stores a conv's magnitude as (1, out, 1, 1) and normalises W + s·BA per output
    channel (over in·kh·kw): the formula, in float64."""
    folder, pipe = world
    mods = {("unet", CONV): layer(pipe, "unet", CONV)}
    factors = peft_dora_file(tmp_path / "conv.safetensors", pipe, mods, seed=5)
    magnitude = load_file(str(tmp_path / "conv.safetensors"))[f"unet.{CONV}.lora_magnitude_vector"].double()
    w = param(pipe, "unet", CONV).double()
    up, down, alpha = factors[("unet", CONV)]
    v = w + alpha / 4 * (up.double().reshape(-1, 4) @ down.double().reshape(4, -1)).reshape(w.shape)
    expected = v * (magnitude.reshape(-1) / v.reshape(v.shape[0], -1).norm(dim=1)).reshape(-1, 1, 1, 1)
    fuse(folder / "pipe", [tmp_path / "conv.safetensors"], tmp_path / "fused")
    got = folder_param(folder_params(tmp_path / "fused", "unet"), CONV)
    assert rel(got, expected, w) < 1e-5


def half_ulp(t):
    return (t.abs() * 2.0 ** -10).max() + 2.0 ** -24


def lycoris_reference(module_cls, org, state_keys=None, **kwargs):
    """A LyCORIS module on ``org`` with random parameters: (its state dict, its merged weight)."""
    gen = torch.Generator().manual_seed(hash(module_cls.__name__ + str(sorted(kwargs.items()))) % 2**31)
    module = module_cls("x", org, 1.0, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale" or name == "rescale":
                p.copy_(p * (1 + 0.2 * torch.rand(p.shape, generator=gen)))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        merged = module.get_merged_weight(multiplier=1.0, shape=org.weight.shape, device="cpu")[0].detach().clone()
    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    return sd, merged


def lycoris_cases(pipe):
    from lycoris.modules import (ButterflyOFTModule, DiagOFTModule, GLoRAModule, IA3Module, LoConModule,
                                 LohaModule, LokrModule)

    to_q, conv, te_q = layer(pipe, "unet", Q), layer(pipe, "unet", CONV), layer(pipe, "text_encoder", TE_Q)
    to_k = layer(pipe, "unet", Q.replace("to_q", "to_k"))
    ff = layer(pipe, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")
    return [  # (label, component, name, layer, module class, kwargs)
        ("dora rows", "unet", Q, to_q, LoConModule, dict(lora_dim=4, alpha=2, weight_decompose=True)),
        ("dora columns", "unet", Q.replace("to_q", "to_v"), layer(pipe, "unet", Q.replace("to_q", "to_v")), LoConModule,
         dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),
        ("dora conv columns", "unet", CONV, conv, LoConModule, dict(lora_dim=4, alpha=1, weight_decompose=True, wd_on_out=False)),
        ("doha", "text_encoder", TE_Q, te_q, LohaModule, dict(lora_dim=2, alpha=2, weight_decompose=True)),  # scale 1: LyCORIS 4.1.3's LoHa/LoKr modules apply alpha/r twice (scale²)
        ("dokr", "unet", Q.replace("attn1", "attn2"), layer(pipe, "unet", Q.replace("attn1", "attn2")), LokrModule,
         dict(lora_dim=2, alpha=2, factor=4, weight_decompose=True)),  # scale 1, as for LoHa
        ("ia3 rows", "unet", Q.replace("to_q", "to_k"), to_k, IA3Module, dict()),
        ("ia3 conv inputs", "unet", "down_blocks.0.resnets.0.conv2", layer(pipe, "unet", "down_blocks.0.resnets.0.conv2"),
         IA3Module, dict(train_on_input=True)),
        ("oft", "unet", "down_blocks.0.attentions.0.proj_in", layer(pipe, "unet", "down_blocks.0.attentions.0.proj_in"),
         DiagOFTModule, dict(lora_dim=8, constraint=1e-3, rescaled=True)),
        ("boft", "unet", "down_blocks.0.attentions.0.proj_out", layer(pipe, "unet", "down_blocks.0.attentions.0.proj_out"),
         ButterflyOFTModule, dict(lora_dim=4, constraint=0, rescaled=True)),
        ("glora", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", ff, GLoRAModule, dict(lora_dim=2, alpha=1)),
        ("glora conv", "unet", "down_blocks.1.resnets.0.conv1", layer(pipe, "unet", "down_blocks.1.resnets.0.conv1"),
         GLoRAModule, dict(lora_dim=2, alpha=1)),
    ]


@pytest.fixture(scope="module")
def lycoris_file(world, tmp_path_factory):
    """Every LyCORIS base-dependent type in one file, with LyCORIS's own merged weights."""
    folder, pipe = world
    sd, refs = {}, {}
    for label, component, name, org, cls, kwargs in lycoris_cases(pipe):
        state, merged = lycoris_reference(cls, org, **kwargs)
        key = kohya(component, name)
        sd |= {f"{key}.{k}": v for k, v in state.items()}
        refs[(component, name)] = (label, merged)
    path = tmp_path_factory.mktemp("lyco") / "lycoris.safetensors"
    save_file(sd, str(path), metadata=SD1)
    return path, refs


def test_lycoris_base_dependent_types_match_lycoris(world, lycoris_file):
    folder, pipe = world
    path, refs = lycoris_file
    lora = loramerge.load(path)
    assert {m.kind for m in lora} == {"lora+dora", "loha+dora", "lokr+dora", "ia3", "oft", "boft", "glora"}
    errors = {}
    for (component, name), (label, merged) in refs.items():
        module = lora[f"{component}.{name}"]
        base = param(pipe, component, name)
        ours = base + module.delta_given(base)
        errors[label] = max(errors.get(label, 0.0), rel(ours, merged, base))
        assert errors[label] < 2e-5, label
    print("\nagainst LyCORIS's own merged weights, max relative error of W' - W: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errors.items())))


def test_lycoris_types_fuse_attach_and_merge_against_a_base(world, lycoris_file, tmp_path):
    folder, pipe = world
    path, refs = lycoris_file
    plain = tiny.random_factors({("unet", Q): layer(pipe, "unet", Q)}, rank=2, alpha=1.0, seed=7)  # same module as a DoRA
    tiny.write_kohya(tmp_path / "plain.safetensors", "sd1", plain)
    w_lyco, w_plain = 0.75, -0.5
    expected = {}
    for (component, name), (_, merged) in refs.items():
        base = param(pipe, component, name).double()
        expected[(component, name)] = base + w_lyco * (merged.double() - base)
    expected[("unet", Q)] += w_plain * tiny.delta_of(*plain[("unet", Q)], param(pipe, "unet", Q).shape).double()
    loras = [path, tmp_path / "plain.safetensors"]
    _, single, mix, mix_pipe, original = fuse_everywhere(world, dict(zip("lp", loras)), {"l": w_lyco, "p": w_plain},
                                                         tmp_path)
    # merge --base (CLI, a diffusers folder) gives a plain LoRA file whose fuse is the same; a single-file base too
    out = tmp_path / "merged.safetensors"
    proc = subprocess.run([sys.executable, "-m", "loramerge", "merge", f"{path}:{w_lyco}", f"{loras[1]}:{w_plain}",
                           "--base", str(folder / "pipe"), "--dtype", "fp32", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fuse(folder / "pipe", [out], tmp_path / "via_merge")
    from_single = loramerge.merge(loras, [w_lyco, w_plain], device="cpu", base=folder / "single.safetensors")
    for (component, name), exp in expected.items():
        sd = folder_params(tmp_path / "fused", component)
        got = {"folder": folder_param(sd, name), "attach": param(mix_pipe, component, name),
               "single": single_param(single, component, name),
               "merge --base": folder_param(folder_params(tmp_path / "via_merge", component), name),
               "merge(base=single file)": param(pipe, component, name) + from_single[f"{component}.{name}"].delta()}
        base = param(pipe, component, name)
        for where, ours in got.items():
            assert rel(ours, exp, base) < 2e-5, f"{where} {refs.get((component, name), ('plain',))[0]}"
    mix.unfuse()
    assert all(torch.equal(original[k], v) for k, v in snapshot(mix_pipe).items())
    # without a base: refused in one line naming the module and --base
    proc = subprocess.run([sys.executable, "-m", "loramerge", "merge", str(path), "-o", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(r"module (unet|text_encoder)\.\S+ is .*depends on the base weight.*--base BASE", proc.stderr), proc.stderr


def test_tlora_and_peft_types_are_named_and_refused(tmp_path):
    key = kohya("unet", Q)
    save_file({f"{key}.q_layer.weight": torch.randn(4, 320), f"{key}.p_layer.weight": torch.randn(320, 4),
               f"{key}.lambda_layer": torch.ones(1, 4), f"{key}.alpha": torch.tensor(4.0)},
              str(tmp_path / "t.safetensors"), metadata=SD1)
    with pytest.raises(UnsupportedModuleError, match=rf"module '{key}' is T-LoRA: .*no fixed weight-space form"):
        loramerge.load(tmp_path / "t.safetensors")
    save_file({f"unet.{Q}.ia3_l": torch.randn(320, 1)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(UnsupportedModuleError, match=rf"module 'unet.{Q}' is PEFT IA3 \(ia3_l\)"):
        loramerge.load(tmp_path / "p.safetensors")
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"  # DoRA's norm cannot be split between q, k and v
    save_file({f"{qkv}.lora_up.weight": torch.randn(9216, 2), f"{qkv}.lora_down.weight": torch.randn(2, 3072),
               f"{qkv}.dora_scale": torch.rand(1, 3072)}, str(tmp_path / "f.safetensors"),
              metadata={"ss_base_model_version": "flux1"})  # HunyuanVideo has the same block names and widths
    with pytest.raises(UnsupportedModuleError, match=rf"module '{qkv}' is DoRA on 'double_blocks.0.img_attn.qkv', "
                                                     "which holds .*to_q, .*to_k, .*to_v in one weight"):
        loramerge.load(tmp_path / "f.safetensors")


# --------------------------------------------------------------------------------------------
# 4. what fuse and attach refuse


def test_fuse_refuses_overflow_integer_and_nan_bases(world, tmp_path):
    folder, pipe = world
    factors = tiny.random_factors({("unet", Q): layer(pipe, "unet", Q)}, rank=2, alpha=1.0, seed=3)
    tiny.write_kohya(tmp_path / "l.safetensors", "sd1", factors)
    sd = load_file(str(folder / "single.safetensors"))
    q_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    other = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    cases = {
        "touched": ({q_key: sd[q_key] + 1e5}, q_key, "fp16", NonFiniteError, "not finite after the cast to float16.*bf16 or fp32"),
        "untouched": ({other: sd[other] + 1e5}, other, "fp16", NonFiniteError, "not finite after the cast to float16"),
        "int16": ({q_key: (sd[q_key] * 100).to(torch.int16)}, q_key, None, LoraMergeError, "int16, not floating point"),
        "nan": ({q_key: sd[q_key].clone().index_fill_(0, torch.tensor([3]), float("nan"))}, q_key, None, NonFiniteError,
                "holds NaN or Inf"),
    }
    for label, (change, tensor, dtype, error, message) in cases.items():
        save_file(sd | change, str(tmp_path / f"{label}.safetensors"))
        out = tmp_path / f"out_{label}.safetensors"
        with pytest.raises(error, match=message) as info:
            fuse(tmp_path / f"{label}.safetensors", [tmp_path / "l.safetensors"], out, dtype=dtype)
        assert tensor in str(info.value), label
        assert not out.exists() and not list(tmp_path.glob(f".out_{label}*"))
    fuse(tmp_path / "untouched.safetensors", [tmp_path / "l.safetensors"], tmp_path / "bf16.safetensors", dtype="bf16")
    mix_pipe = tiny.sd15_pipeline()
    to_q = layer(mix_pipe, "unet", Q)
    to_q.weight = torch.nn.Parameter(to_q.weight.detach().to(torch.int16), requires_grad=False)
    with pytest.raises(LoraMergeError, match=rf"parameter unet.{Q} is int16, not floating point"):
        loramerge.attach(mix_pipe, {"l": tmp_path / "l.safetensors"})
