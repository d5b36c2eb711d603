"""Full-size key sets: the real SD1.5 and SDXL UNets and CLIP text encoders, built on the meta
device from their configs, enumerate every module and shape. A kohya-named LoRA on every
attention, feed-forward and proj module must convert kohya→canonical→kohya unchanged and
kohya→diffusers with every key placed on a module of the right shape — checked against the
models themselves and against diffusers' own kohya converter.
"""

import gzip
import json
import re
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loramerge
from loramerge.formats import keymaps
from loramerge.formats.schemes.sgm import diffusers_to_sgm

ATTN_FF_PROJ = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out)"
    r"|self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
)
UP_WITH_ATTENTION = {"sd1": (1, 2, 3), "sdxl": (0, 1)}


def meta_modules(arch):
    """{(component, canonical name): weight shape} of the real model, enumerated on meta."""
    found = {}
    for component, config in keymaps.configs()[arch].items():
        model = keymaps.build_model(config, "meta")
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ATTN_FF_PROJ.search(name):
                found[(component, keymaps.canonical_module_name(model, name))] = tuple(module.weight.shape)
    return found


def kohya_key(arch, component, name):
    if component == "unet":
        if arch == "sdxl":
            name = diffusers_to_sgm(name, UP_WITH_ATTENTION[arch])
        return "lora_unet_" + name.replace(".", "_")
    prefix = {"sd1": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
    return prefix[arch][component] + name.replace(".", "_")


def kohya_file(path, arch, modules, rank=2):
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for (component, name), shape in sorted(modules.items()):
        key = kohya_key(arch, component, name)
        n = 1
        for s in shape[1:]:
            n *= s
        down = torch.randn(rank, *shape[1:], generator=gen).to(torch.float16)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen).to(torch.float16)
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_shipped_tables_match_the_real_models(arch):
    """The key-map data loramerge ships equals what the real models enumerate."""
    for component, config in keymaps.configs()[arch].items():
        model = keymaps.build_model(config, "meta")
        assert keymaps.table(arch)[component] == {k: tuple(v) for k, v in keymaps.module_shapes(model).items()}


@pytest.mark.parametrize("arch, expected_unet", [("sd1", 192), ("sdxl", 722)])
def test_kohya_roundtrip_and_diffusers_placement(tmp_path, arch, expected_unet):
    modules = meta_modules(arch)
    assert sum(c == "unet" for c, _ in modules) == expected_unet
    sd = kohya_file(tmp_path / "in.safetensors", arch, modules)

    lora = loramerge.load(tmp_path / "in.safetensors")
    assert lora.arch == arch and lora.format == "kohya"
    assert {(m.component, m.name): m.shape for m in lora} == modules  # every key on the right module

    loramerge.save(lora, tmp_path / "back.safetensors", format="kohya")
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)
        for key in sd:
            if not key.endswith(".alpha"):
                assert torch.equal(f.get_tensor(key), sd[key]), key

    loramerge.save(lora, tmp_path / "out.safetensors", format="diffusers")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        keys = list(f.keys())
        placed = {}
        for key in keys:
            component, _, rest = key.partition(".")
            name, _, role = rest.rpartition(".lora_")
            if role == "A.weight":
                placed[(component, name)] = (f.get_tensor(key).shape[1:], f.get_tensor(key.replace("lora_A", "lora_B")).shape[0])
    assert len(keys) == 2 * len(modules)
    for (component, name), (down_in, up_out) in placed.items():
        shape = modules[(component, name)]
        assert (up_out, *down_in) == shape


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sgm_and_kohya_names_agree_with_diffusers_converter(tmp_path, arch):
    """diffusers' own kohya converter (sgm block remap included) lands every key of our kohya
    file on the module loramerge read it as."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    modules = meta_modules(arch)
    sd = kohya_file(tmp_path / "in.safetensors", arch, modules, rank=1)
    sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    theirs = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}
        if not part:
            continue
        if component == "unet":
            peft = convert_unet_state_dict_to_peft(part)
        else:
            peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        theirs |= {(component, k[: -len(".lora_A.weight")]) for k in peft if k.endswith(".lora_A.weight")}
    assert theirs == set(modules)


def test_sdxl_sgm_resnet_and_sampler_names_round_trip():
    """Resnet internals, down/upsamplers and top-level modules map sgm ↔ diffusers both ways."""
    from loramerge.formats.schemes.sgm import sgm_to_diffusers

    layout = (0, 1)
    table = keymaps.table("sdxl")["unet"]
    for name in table:
        sgm = diffusers_to_sgm(name, layout)
        assert sgm_to_diffusers(sgm) == name, (name, sgm)
    assert diffusers_to_sgm("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.3.0.op"
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    assert diffusers_to_sgm("up_blocks.1.resnets.2.conv_shortcut", layout) == "output_blocks.5.0.skip_connection"
    assert diffusers_to_sgm("mid_block.resnets.1.time_emb_proj", layout) == "middle_block.2.emb_layers.1"
    assert diffusers_to_sgm("add_embedding.linear_2", layout) == "label_emb.0.2"
