"""Switching between two 2-LoRA mixes on an SDXL-sized UNet on the CPU: loramerge's live mix vs
diffusers' set_adapters + fuse_lora / unfuse_lora, one thread.

Four LoRAs (rank 16, all 722 attention/ff/proj modules) are loaded into one SDXL UNet (real
config, random weights). Each cycle switches to the other mix (mix A = a·0.7 + b·0.8,
mix B = c·0.5 + d·1.0) and back. Reported: seconds per switch and, after the cycles and a
final unfuse, the largest difference from the original weights (drift) for each tool.
Run: python bench/switch.py [--cycles 100] [--dtype fp16|bf16|fp32] [--modules N]
--modules N puts the LoRAs on N evenly spaced modules of the 722 only: drift is a per-weight
effect, so many cycles on a subset measure it as well, in a fraction of the time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (one thread)
import torch

import loramerge
from loramerge.formats import keymaps
from loramerge.synthetic import attention_targets, random_lora

MIX_A = {"a": 0.7, "b": 0.8, "c": 0.0, "d": 0.0}
MIX_B = {"a": 0.0, "b": 0.0, "c": 0.5, "d": 1.0}


class Holder:
    """The smallest 'pipeline' both tools accept: an object with a unet attribute."""

    def __init__(self, unet):
        self.unet = unet


def build_unet(dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(keymaps.configs()["sdxl"]["unet"]).to(dtype).eval()


def snapshot(unet, keys):
    return {k: unet.get_submodule(k).weight.detach().clone() for k in keys}


def drift(unet, before, layer=lambda m: m):
    worst = 0.0
    for k, w in before.items():
        now = layer(unet.get_submodule(k)).weight.detach()
        worst = max(worst, float((now.float() - w.float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--modules", type=int, help="LoRAs on this many evenly spaced modules only")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # PEFT's per-adapter key listings are long
    folder = Path(tempfile.mkdtemp(prefix="loramerge-switch-"))
    targets = attention_targets("sdxl", ("unet",))
    if args.modules:
        chosen = sorted(targets)[:: max(1, len(targets) // args.modules)][: args.modules]
        targets = {k: targets[k] for k in chosen}
    files = {}
    for seed, name in enumerate("abcd"):
        files[name] = folder / f"{name}.safetensors"
        loramerge.save(random_lora("sdxl", targets, rank=16, alpha=16, seed=seed, dtype=torch.float16), files[name], format="diffusers")
    keys = [name for _, name in targets]
    print(f"SDXL UNet ({args.dtype}, CPU, 1 thread), 4 LoRAs × {len(targets)} modules, {args.cycles} cycles of A → B → A")

    # loramerge
    unet = build_unet(dtype)
    before = snapshot(unet, keys)
    mix = loramerge.attach(Holder(unet), files)
    mix.set_weights(MIX_A)
    mix.fuse()
    start = time.perf_counter()
    for _ in range(args.cycles):
        mix.set_weights(MIX_B)
        mix.set_weights(MIX_A)
    ours = (time.perf_counter() - start) / (2 * args.cycles)
    mix.unfuse()
    ours_drift = drift(unet, before)
    cost = mix.memory_cost() / 2**30
    del mix, unet

    # diffusers: the documented way to switch a fused mix
    from diffusers import StableDiffusionXLPipeline

    unet = build_unet(dtype)
    before = snapshot(unet, keys)
    for name, path in files.items():
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path))
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=name)
    pipe = Holder(unet)

    def use(weights):
        names = [n for n, w in weights.items() if w]
        unet.set_adapters(names, weights=[weights[n] for n in names])
        unet.fuse_lora(lora_scale=1.0, adapter_names=names)

    use(MIX_A)
    start = time.perf_counter()
    for _ in range(args.cycles):
        unet.unfuse_lora()
        use(MIX_B)
        unet.unfuse_lora()
        use(MIX_A)
    theirs = (time.perf_counter() - start) / (2 * args.cycles)
    unet.unfuse_lora()
    theirs_drift = drift(unet, before, layer=lambda m: getattr(m, "base_layer", m))
    del pipe

    print(f"loramerge: {ours:.2f} s per switch, drift after unfuse {ours_drift:.3g} "
          f"(restore copies held: {cost:.2f} GiB)")
    print(f"diffusers: {theirs:.2f} s per switch, drift after unfuse {theirs_drift:.3g}")
    print(f"ratio (diffusers / loramerge time per switch): {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
