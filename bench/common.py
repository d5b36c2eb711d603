"""Shared set-up for the benchmarks: one thread, and two SDXL UNet LoRAs on disk."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

from loramerge.synthetic import attention_targets, random_lora  # noqa: E402


def sdxl_pair(folder: Path) -> tuple[Path, Path, dict]:
    """Two kohya LoRAs on all 722 attention/ff/proj modules of the SDXL UNet: ranks 32 and 16,
    fp16, random factors. Reused when already in ``folder``."""
    targets = attention_targets("sdxl", ("unet",))
    assert len(targets) == 722, len(targets)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    if not (a.exists() and b.exists()):
        random_lora("sdxl", targets, rank=32, alpha=16, seed=1, dtype=torch.float16).save(a, format="kohya")
        random_lora("sdxl", targets, rank=16, alpha=16, seed=2, dtype=torch.float16).save(b, format="kohya")
    return a, b, targets


def one_per_shape(targets: dict):
    """{shape: a module name of that shape}, and how many modules have each shape."""
    import collections

    by_shape, counts = {}, collections.Counter()
    for (_, name), shape in sorted(targets.items()):
        by_shape.setdefault(tuple(shape), name)
        counts[tuple(shape)] += 1
    return by_shape, counts
