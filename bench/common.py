"""Shared set-up for the benchmarks: one thread, and two SDXL UNet LoRAs on disk."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

import loramerge  # noqa: E402
from loramerge.synthetic import attention_targets, random_lora  # noqa: E402


def sdxl_pair(folder: Path) -> tuple[Path, Path, dict]:
    """Two kohya LoRAs on all 722 attention/ff/proj modules of the SDXL UNet: ranks 32 and 16,
    fp16, random factors. Reused when already in ``folder``."""
    targets = attention_targets("sdxl", ("unet",))
    assert len(targets) == 722, len(targets)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    if not (a.exists() and b.exists()):
        loramerge.save(random_lora("sdxl", targets, rank=32, alpha=16, seed=1, dtype=torch.float16), a, format="kohya")
        loramerge.save(random_lora("sdxl", targets, rank=16, alpha=16, seed=2, dtype=torch.float16), b, format="kohya")
    return a, b, targets


def one_per_shape(targets: dict):
    """{shape: a module name of that shape}, and how many modules have each shape."""
    import collections

    by_shape, counts = {}, collections.Counter()
    for (_, name), shape in sorted(targets.items()):
        by_shape.setdefault(tuple(shape), name)
        counts[tuple(shape)] += 1
    return by_shape, counts


def peft_pair(la, lb, name: str):
    """A one-layer PEFT model holding module ``name`` of two LoRAs as adapters "first" and
    "second" (their exact factors); returns (model, the LoRA layer)."""
    from peft import LoraConfig, get_peft_model

    ma, mb = la[f"unet.{name}"], lb[f"unet.{name}"]
    model = torch.nn.Sequential()
    model.add_module("target", torch.nn.Linear(ma.in_features, ma.out_features, bias=False))
    model = get_peft_model(model, LoraConfig(r=ma.rank, lora_alpha=ma.alpha, target_modules=["target"]),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(r=mb.rank, lora_alpha=mb.alpha, target_modules=["target"]))
    layer = model.base_model.model.target
    for adapter, module in (("first", ma), ("second", mb)):
        up, down = module.factors()
        layer.lora_A[adapter].weight.data.copy_(down)
        layer.lora_B[adapter].weight.data.copy_(up)
    return model, layer
