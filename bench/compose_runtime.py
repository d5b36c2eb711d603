"""Seconds per image of the inference-time composition methods against the static merge, measured
side by side in one run, one thread.

1. An SDXL-sized UNet (real config, random float32 weights) on the CPU, two LoRAs (ranks 32 and
   16 on all 722 attention/ff/proj modules), a denoising loop with classifier-free guidance
   (batch 2) at a small latent size: static = the two LoRAs merged (linear) and patched into
   the weights once (patch time reported apart); every other row runs loramerge.compose's
   unfused hooks.
2. The tiny digit world's pipeline, two style LoRAs, 20 images per method.
Ratios are to the static merge of the same part.
Run: python bench/compose_runtime.py [--steps 2] [--latent 32] [--skip-sdxl]
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

METHODS = [
    ("mix (hooks)", "mix", {}),
    ("schedule", "schedule", {"weights": {"a": {"progress": [[0, 1.0], [1, 0.3]]}, "b": {"progress": [[0, 0.3], [1, 1.0]]}}}),
    ("switch, tau 1", "switch", {"tau": 1}),
    ("composite", "composite", {}),
    ("k-lora", "klora", {}),
]


class Loop:
    """The smallest pipeline compose accepts (a unet and a scheduler) with an SDXL-style loop."""

    def __init__(self, unet, steps: int, latent: int):
        from diffusers import EulerDiscreteScheduler

        self.unet = unet
        self.scheduler = EulerDiscreteScheduler()
        self.steps = steps
        g = torch.Generator().manual_seed(0)
        config = unet.config
        self.latents = torch.randn(1, config.in_channels, latent, latent, generator=g)
        self.text = torch.randn(2, 77, config.cross_attention_dim, generator=g)
        self.added = {"text_embeds": torch.randn(2, 1280, generator=g),
                      "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * 2, dtype=torch.float32)}

    @torch.no_grad()
    def __call__(self, guidance: float = 5.0):
        self.scheduler.set_timesteps(self.steps)
        x = self.latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            model_in = self.scheduler.scale_model_input(torch.cat([x] * 2), t)
            uncond, cond = self.unet(model_in, t, encoder_hidden_states=self.text, added_cond_kwargs=self.added,
                                     return_dict=False)[0].chunk(2)
            x = self.scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
        return x


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sdxl_part(steps: int, latent: int) -> list[tuple[str, float, str]]:
    from diffusers import UNet2DConditionModel

    folder = Path(tempfile.mkdtemp(prefix="loramerge-compose-bench-"))
    a, b, targets = common.sdxl_pair(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(keymaps.configs()["sdxl"]["unet"]).eval()
    loop = Loop(unet, steps, latent)
    loras = {"a": loramerge.load(a), "b": loramerge.load(b)}
    rows = []
    merged = loramerge.merge(list(loras.values()), method="linear", device="cpu")
    mix = loramerge.attach(loop, {"merged": merged})
    patch_s, _ = timed(mix.fuse)
    static_s, _ = timed(loop)
    mix.detach()
    rows.append(("static merge (linear, patched)", static_s, f"+ {patch_s:.1f} s to patch the weights once"))
    for label, method, params in METHODS:
        setup_s, handle = timed(lambda: loramerge.compose(loop, loras, method=method, **params))
        seconds, _ = timed(loop)
        handle.remove()
        rows.append((label, seconds, f"set-up {setup_s:.1f} s"))
        print(f"  {label}: {seconds:.1f} s", flush=True)
    return rows


def tiny_part(images: int = 20) -> list[tuple[str, float, str]]:
    from loramerge import tinyworld as tw
    from loramerge.tinyworld import composition as comp

    pipe = tw.load_pipeline()
    loras = comp.load_styles(("bold", "slanted"))
    prompts = [tw.prompt(d % 10, ["bold", "slanted"]) for d in range(images)]
    rows = []
    merged = comp.merged_for("linear", list(loras.values()), [1.0, 1.0])
    with comp.with_mix(pipe, {"m": merged}, {"m": 1.0}):
        tw.generate(pipe, prompts[:2])  # warm-up
        seconds, _ = timed(lambda: tw.generate(pipe, prompts))
    rows.append(("static merge (linear, patched)", seconds / images, ""))
    methods = [(label, m, {"bold": p["weights"]["a"], "slanted": p["weights"]["b"]} if "weights" in p else p)
               for label, m, p in METHODS]
    methods.append(("composite, own prompts", "composite", {"prompts": "own"}))
    for label, method, params in methods:
        params = {"weights": params} if method == "schedule" else params
        with loramerge.compose(pipe, loras, method=method, **params):
            seconds, _ = timed(lambda: tw.generate(pipe, prompts))
        rows.append((label, seconds / images, ""))
    return rows


def table(title: str, rows, unit: str) -> str:
    base = rows[0][1]
    lines = [f"### {title}", "", f"| method | {unit} | × static | note |", "|---|---:|---:|---|"]
    lines += [f"| {label} | {s:.3g} | {s / base:.2f} | {note} |" for label, s, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--skip-sdxl", action="store_true")
    args = parser.parse_args()
    out = []
    if not args.skip_sdxl:
        print(f"SDXL UNet (fp32, CPU, 1 thread), latent {args.latent}x{args.latent}, {args.steps} steps, CFG batch 2")
        out.append(table(f"SDXL-sized UNet, {args.steps} steps at {args.latent * 8} px: seconds per image",
                         sdxl_part(args.steps, args.latent), "s / image"))
    out.append(table("Tiny digit world, bold + slanted, 10 steps: seconds per image", tiny_part(), "s / image"))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
