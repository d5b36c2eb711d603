"""Fusing one SDXL-sized LoRA (722 modules, rank 32) into an SDXL-sized single-file checkpoint.

The script writes a random fp16 SDXL checkpoint in LDM/sgm naming (UNet and both text
encoders, ~5 GB, once, into --keep), then in one run:
  1. a plain copy of the file (the floor any streaming fuse is compared to);
  2. `loramerge fuse` file to file in a subprocess, its wall time and peak RSS;
  3. diffusers' route for the UNet: UNet2DConditionModel.from_single_file (local config),
     load_lora_adapter, fuse_lora, save_pretrained — wall time and peak RSS.
Targets: loramerge under 2× the copy's time, peak RSS under 1.5 GB.
Run: python bench/fuse.py [--keep DIR] [--skip-diffusers]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import loramerge

from loramerge.formats import keymaps
from loramerge.formats.schemes.sgm import diffusers_to_sgm
from loramerge.formats.safetensors_io import StreamingWriter, TensorSpec
from loramerge.synthetic import attention_targets, random_lora

LAYOUT = (0, 1)
OPENCLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
            ("self_attn.out_proj", "attn.out_proj"))


def sdxl_single_file_specs() -> dict[str, tuple[int, ...]]:
    """Every tensor of an SDXL single file (UNet, CLIP-L, OpenCLIP-G), from the real configs on meta."""
    cfg = keymaps.configs()["sdxl"]
    specs = {}
    unet = keymaps.build_model(cfg["unet"])
    for key, p in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        specs["model.diffusion_model." + diffusers_to_sgm(module, LAYOUT) + "." + param] = tuple(p.shape)
    te = keymaps.build_model(cfg["text_encoder"])
    for key, p in te.state_dict().items():
        if not key.endswith("position_ids"):
            specs["conditioner.embedders.0.transformer." + keymaps.canonical_module_name(te, key)] = tuple(p.shape)
    te2 = keymaps.build_model(cfg["text_encoder_2"])
    prefix = "conditioner.embedders.1.model."
    for key, p in te2.state_dict().items():
        key = keymaps.canonical_module_name(te2, key)
        if key.endswith("position_ids"):
            continue
        if ".self_attn.q_proj." in key:
            layer, kind = key.split(".")[3], key.rsplit(".", 1)[1]
            specs[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = (3 * p.shape[0], *p.shape[1:])
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers."):]
            layer, rest = rest.split(".", 1)
            for old, new in OPENCLIP:
                rest = rest.replace(old, new)
            specs[f"{prefix}transformer.resblocks.{layer}.{rest}"] = tuple(p.shape)
    specs[prefix + "token_embedding.weight"] = (49408, 1280)
    specs[prefix + "positional_embedding"] = (77, 1280)
    specs[prefix + "ln_final.weight"] = (1280,)
    specs[prefix + "ln_final.bias"] = (1280,)
    specs[prefix + "text_projection"] = (1280, 1280)
    return specs


def write_checkpoint(path: Path) -> None:
    specs = sdxl_single_file_specs()
    gen = torch.Generator().manual_seed(0)
    with StreamingWriter(path, [TensorSpec(k, torch.float16, s) for k, s in specs.items()]) as writer:
        for spec in writer.order:
            fan_in = max(1, int(torch.Size(spec.shape[1:]).numel()))
            writer.write(spec.name, (torch.randn(spec.shape, generator=gen) / fan_in**0.5).to(torch.float16))


def timed_child(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far: run the smallest first
    return seconds, max(peak, before) / 2**20


DIFFUSERS_ROUTE = r"""
import json, sys, torch
torch.set_num_threads(1)
from diffusers import UNet2DConditionModel
ckpt, config, lora, out = sys.argv[1:5]
unet = UNet2DConditionModel.from_single_file(ckpt, config=config, subfolder="unet", local_files_only=True,
                                             torch_dtype=torch.float16)
from diffusers import StableDiffusionXLPipeline
state, alphas = StableDiffusionXLPipeline.lora_state_dict(lora, unet_config=unet.config)
StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="a")
unet.fuse_lora(lora_scale=1.0)
unet.unload_lora()
unet.save_pretrained(out)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="folder for the ~5 GB checkpoint (reused)")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loramerge-fuse-"))
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "sdxl.safetensors"
    if not ckpt.exists():
        start = time.perf_counter()
        write_checkpoint(ckpt)
        print(f"wrote {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    lora = folder / "lora.safetensors"
    if not lora.exists():
        loramerge.save(random_lora("sdxl", attention_targets("sdxl", ("unet",)), rank=32, alpha=16, seed=1,
                                   dtype=torch.float16), lora, format="kohya")

    start = time.perf_counter()
    shutil.copyfile(ckpt, folder / "copy.safetensors")
    copy_seconds = time.perf_counter() - start
    (folder / "copy.safetensors").unlink()
    print(f"plain copy: {copy_seconds:.1f} s")

    ours, ours_rss = timed_child([sys.executable, "-m", "loramerge", "fuse", "--base", str(ckpt), "--lora",
                                  f"{lora}:0.8", "--threads", "1", "-o", str(folder / "fused.safetensors")])
    print(f"loramerge fuse (722 modules): {ours:.1f} s = {ours / copy_seconds:.2f}× the copy, peak RSS {ours_rss:.2f} GiB")
    (folder / "fused.safetensors").unlink()

    if not args.skip_diffusers:
        config = folder / "config"
        (config / "unet").mkdir(parents=True, exist_ok=True)
        unet_config = dict(keymaps.configs()["sdxl"]["unet"])
        (config / "unet" / "config.json").write_text(json.dumps(unet_config))
        script = folder / "diffusers_route.py"
        script.write_text(DIFFUSERS_ROUTE)
        theirs, theirs_rss = timed_child([sys.executable, str(script), str(ckpt), str(config), str(lora),
                                          str(folder / "diffusers_out")])
        shutil.rmtree(folder / "diffusers_out", ignore_errors=True)
        print(f"diffusers route, UNet only (from_single_file, load LoRA, fuse_lora, save_pretrained): "
              f"{theirs:.1f} s, peak RSS {theirs_rss:.2f} GiB (max over this run's children)")
    print(f"targets: time under 2× copy ({'met' if ours < 2 * copy_seconds else 'MISSED'}), "
          f"peak RSS under 1.5 GiB ({'met' if ours_rss < 1.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
