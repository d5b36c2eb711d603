"""Architecture detection uses every hint a file gives — keys and their prefixes, full-size
shapes, ss_base_model_version, modelspec.architecture, a PEFT folder's base_model_name_or_path —
and says so when nothing decides, instead of picking one."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loramerge
from loramerge.errors import AmbiguousArchitectureError, ArchitectureMismatchError

G = torch.Generator().manual_seed(0)
CLIP_L_Q = "text_model.encoder.layers.0.self_attn.q_proj"  # 768×768 in SD1, SDXL, SD3 and Flux alike


def clip_factors(prefix: str, style: str = "kohya") -> dict:
    up, down = torch.randn(768, 4, generator=G), torch.randn(4, 768, generator=G)
    if style == "kohya":
        key = prefix + CLIP_L_Q.replace(".", "_")
        return {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(4.0)}
    return {f"{prefix}{CLIP_L_Q}.lora_A.weight": down, f"{prefix}{CLIP_L_Q}.lora_B.weight": up}


def peft_folder(tmp_path, base_model: str | None):
    folder = tmp_path / "te_adapter"
    folder.mkdir()
    save_file(clip_factors("base_model.model.", "peft"), str(folder / "adapter_model.safetensors"))
    config = {"r": 4, "lora_alpha": 8, "peft_type": "LORA", "target_modules": ["q_proj"]}
    if base_model:
        config["base_model_name_or_path"] = base_model
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_peft_text_encoder_folder_takes_the_base_model_it_names(tmp_path):
    folder = peft_folder(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    lora = loramerge.load(folder)
    assert lora.arch == "sdxl" and lora.components == ["text_encoder"]
    loramerge.save(lora, tmp_path / "k.safetensors", format="kohya")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert all(k.startswith("lora_te1_") for k in f.keys())  # SDXL's CLIP-L prefix, not SD1's lora_te_
    sd1 = tmp_path / "sd1.safetensors"
    save_file(clip_factors("lora_te_"), str(sd1))  # lora_te_ exists only in SD1/SD2 (and SD2's encoder is wider)
    assert loramerge.load(sd1).arch == "sd1"
    with pytest.raises(ArchitectureMismatchError, match="sd1 LoRA but .* is sdxl"):
        loramerge.merge([folder, sd1])


def test_same_folder_without_a_hint_is_ambiguous_and_says_so(tmp_path):
    folder = peft_folder(tmp_path, None)
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(folder)
    assert set(info.value.candidates) == {"sd1", "sdxl", "sd3", "flux"}
    assert "--arch" in str(info.value)
    assert loramerge.load(folder, arch="flux").arch == "flux"
    proc = subprocess.run([sys.executable, "-m", "loramerge", "inspect", str(folder)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "give --arch" in proc.stderr


def test_an_ambiguous_file_takes_the_architecture_of_the_others_in_a_merge(tmp_path):
    folder = peft_folder(tmp_path, None)
    sd1 = tmp_path / "sd1.safetensors"
    save_file(clip_factors("lora_te_"), str(sd1))
    assert loramerge.merge([sd1, folder]).arch == "sd1"


@pytest.mark.parametrize("metadata, expected", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_base_model_version": "flux1"}, "flux"),
    ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
])
def test_header_fields_decide_between_equal_fits(tmp_path, metadata, expected):
    path = tmp_path / "te1.safetensors"
    save_file(clip_factors("lora_te1_"), str(path), metadata=metadata)  # lora_te1_: SDXL, SD3 or Flux
    assert loramerge.load(path).arch == expected


def test_key_prefixes_narrow_the_field(tmp_path):
    path = tmp_path / "te1.safetensors"
    save_file(clip_factors("lora_te1_"), str(path))
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(path)
    assert set(info.value.candidates) == {"sdxl", "sd3", "flux"}  # never SD1: it has no lora_te1_
    path = tmp_path / "comfy.safetensors"
    save_file(clip_factors("text_encoders.clip_l.transformer.", "peft"), str(path))
    with pytest.raises(AmbiguousArchitectureError) as info:
        loramerge.load(path)
    assert set(info.value.candidates) == {"sdxl", "sd3", "flux"}


def test_shapes_outrank_a_contradicting_header(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "x.safetensors"
    save_file({f"{key}.lora_up.weight": torch.randn(320, 4), f"{key}.lora_down.weight": torch.randn(4, 1024)},
              str(path), metadata={"ss_base_model_version": "sd_v1"})  # the header says SD1, the 1024 says SD2
    assert loramerge.load(path).arch == "sd2"


def test_lokr_reports_its_own_dim_and_alpha_and_the_delta_rank_apart(tmp_path):
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 640×640
    path = tmp_path / "lokr.safetensors"
    save_file({f"{key}.lokr_w1": torch.randn(4, 4, generator=G), f"{key}.lokr_w2_a": torch.randn(160, 4, generator=G),
               f"{key}.lokr_w2_b": torch.randn(4, 160, generator=G), f"{key}.alpha": torch.tensor(4.0)},
              str(path), metadata={"ss_base_model_version": "sd_v1"})
    proc = subprocess.run([sys.executable, "-m", "loramerge", "inspect", str(path), "--json", "--no-norms"],
                          capture_output=True, text=True)
    summary = json.loads(proc.stdout)
    assert summary["dims"] == {"4": 1} and summary["alphas"] == {"4": 1} and summary["ranks"] == {"16": 1}
    out = tmp_path / "as_lora.safetensors"
    proc = subprocess.run([sys.executable, "-m", "loramerge", "convert", str(path), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "note:" in proc.stderr and "--rank" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loramerge", "convert", str(path), "-o", str(tmp_path / "r4.safetensors"),
                           "--rank", "4"], capture_output=True, text=True)
    assert proc.returncode == 0 and "energy kept" in proc.stderr and "note:" not in proc.stderr
    assert set(loramerge.load(tmp_path / "r4.safetensors").ranks) == {4}
