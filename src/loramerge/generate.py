"""Images from a local diffusers pipeline with LoRAs mixed in, laid out as a labelled grid:
one row per prompt, one column per value of the grid axis (LoRA weight scale, or merge method).
Every cell uses the same seed, so columns differ only by the mix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import LoraMergeError, UsageError
from .io import load
from .merge import merge
from .methods import get_method
from .outputs import Staged, check_output
from .runtime import attach


@dataclass
class Axis:
    name: str  # "weight" or "method"
    values: list

    def label(self, value) -> str:
        return f"{self.name}={value}"


def parse_axis(text: str | None) -> Axis:
    if not text:
        return Axis("weight", [1.0])
    name, sep, values = text.partition("=")
    if not sep or not values:
        raise UsageError(f"--grid expects weight=V1,V2,… or method=M1,M2,…, got {text!r}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if name == "weight":
        try:
            return Axis("weight", [float(v) for v in items])
        except ValueError:
            raise UsageError(f"--grid weight= takes numbers, got {values!r}") from None
    if name == "method":
        for m in items:
            get_method(m)
        return Axis("method", items)
    raise UsageError(f"--grid axis must be weight or method, got {name!r}")


def load_pipeline(base: str | os.PathLike):
    from diffusers import DiffusionPipeline

    path = Path(base)
    if not (path / "model_index.json").is_file():
        raise LoraMergeError("not a diffusers pipeline folder (no model_index.json)", path)
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str, seed: int, steps: int, guidance: float):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]


def generate_grid(base, loras: Sequence[tuple[str, float]], prompts: Sequence[str], output,
                  axis: Axis | None = None, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                  cell: int = 128) -> Path:
    axis = axis or Axis("weight", [1.0])
    if not prompts:
        raise UsageError("give at least one --prompt")
    if steps < 1 or not math.isfinite(guidance) or cell < 1:
        raise UsageError(f"--steps must be at least 1 and --guidance finite, got {steps} and {guidance}")
    output = check_output(output, [base] + [path for path, _ in loras])  # before anything is rendered
    pipe = load_pipeline(base)
    inputs = {f"lora{i}": load(path) for i, (path, _) in enumerate(loras)}
    weights = {f"lora{i}": w for i, (_, w) in enumerate(loras)}
    columns = []
    for value in axis.values:
        if axis.name == "weight":
            mix = attach(pipe, inputs) if inputs else None
            if mix:
                mix.set_weights({k: w * value for k, w in weights.items()})
                mix.fuse()
        else:
            method = get_method(value)
            rank = max(m.rank for lora in inputs.values() for m in lora) if method.uses_rank else None
            merged = merge(list(inputs.values()), list(weights.values()), method=value, rank=rank)
            mix = attach(pipe, {"merged": merged})
            mix.fuse()
        columns.append([render(pipe, p, seed, steps, guidance) for p in prompts])
        if mix:
            mix.detach()
    return save_grid(columns, [axis.label(v) for v in axis.values], list(prompts), output, cell)


def save_grid(columns, column_labels, row_labels, output, cell: int = 128) -> Path:
    """A PNG with one labelled column per mix and one labelled row per prompt (atomic write)."""
    from PIL import Image, ImageDraw

    label_w, label_h = 160, 24
    width = label_w + cell * len(columns)
    height = label_h + cell * len(row_labels)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, images) in enumerate(zip(column_labels, columns)):
        x = label_w + c * cell
        draw.text((x + 4, 6), label, fill="black")
        for r, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, label_h + r * cell))
    for r, label in enumerate(row_labels):
        draw.text((4, label_h + r * cell + cell // 2 - 6), label[:26], fill="black")
    output = Path(output)
    with Staged([output]) as (tmp,):
        canvas.save(tmp, format="PNG")
    return output
