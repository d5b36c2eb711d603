"""Scoring how well a merge keeps each LoRA's effect, in the tiny digit world.

For a mix of style LoRAs, samples are generated for every digit with all the styles' trigger
words in the prompt, then measured:
- digit accuracy: how often the classifier reads the prompted digit;
- style hit rate per style: how often that style's detector fires;
- retention per style: the hit rate divided by the hit rate of that LoRA alone (prompted with
  its own trigger word) — 1 means the merge keeps the style as well as the LoRA alone;
- composition score = digit accuracy × the smaller retention (a merge must keep the digit
  legible and both styles to score well).
The mix is applied through the live mixer (a merged LoRA attaches like a file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import tinyworld as tw
from ..io import load
from ..lora import LoRA
from ..merge import merge
from ..methods import get_method
from ..runtime import attach


@dataclass
class Score:
    label: str
    accuracy: float
    hits: dict[str, float]
    retention: dict[str, float] = field(default_factory=dict)

    @property
    def composition(self) -> float:
        return self.accuracy * min(self.retention.values()) if self.retention else float("nan")

    def row(self) -> dict:
        out = {"mix": self.label, "digit_accuracy": round(self.accuracy, 4)}
        out.update({f"hit_{s}": round(v, 4) for s, v in self.hits.items()})
        out.update({f"retention_{s}": round(v, 4) for s, v in self.retention.items()})
        out["composition"] = round(self.composition, 4)
        return out


def sample(pipe, styles, per_digit: int, seed: int, guidance: float = tw.DEFAULT_GUIDANCE):
    """Images for every digit, prompted with the styles' trigger words, and the digits."""
    prompts, digits = tw.digit_prompts(per_digit=per_digit, styles=list(styles))
    return tw.generate(pipe, prompts, seed=seed, guidance=guidance), digits


def score_images(label: str, images, digits, styles, alone: dict[str, float] | None = None) -> Score:
    """Digit accuracy, each style's hit rate and, given the styles' rates alone, retention."""
    accuracy = float((tw.classify(images) == np.asarray(digits)).mean())
    hits = {s: float(v.mean()) for s, v in tw.style_hits(images, list(styles) or None).items() if s in styles}
    score = Score(label, accuracy, hits)
    if alone:
        score.retention = {s: (hits[s] / alone[s] if alone[s] > 0 else 0.0) for s in styles}
    return score


def measure(pipe, label: str, styles, per_digit: int, seed: int, alone: dict[str, float] | None = None,
            guidance: float = tw.DEFAULT_GUIDANCE):
    images, digits = sample(pipe, styles, per_digit, seed, guidance)
    return score_images(label, images, digits, styles, alone), images


def real_reference(styles) -> Score:
    """The same measurements on held-out real digits with every style's transform applied: the
    ceiling of what the detectors can report for this combination (some transforms fight, e.g.
    shrinking a digit thins the strokes that bold thickened)."""
    from . import data

    images, digits = data.load_split("held_out")
    alone = {s: float(tw.style_hits(data.TRANSFORMS[s](images), [s])[s].mean()) for s in styles}
    styled = data.apply_styles(images, list(styles))
    return score_images("real digits, both transforms", styled, digits, styles, alone)


def with_mix(pipe, loras: dict[str, LoRA], weights: dict[str, float]):
    """A context: the pipeline with the mix fused in, restored exactly afterwards."""

    class _Mix:
        def __enter__(self):
            self.mix = attach(pipe, loras)
            self.mix.set_weights(weights)
            self.mix.fuse()
            return self.mix

        def __exit__(self, *exc):
            self.mix.detach()

    return _Mix()


def alone_rates(pipe, loras: dict[str, LoRA], per_digit: int, seed: int) -> dict[str, tuple[Score, torch.Tensor]]:
    """Each style LoRA on its own, prompted with its own trigger word."""
    out = {}
    for style, lora in loras.items():
        with with_mix(pipe, {style: lora}, {style: 1.0}):
            out[style] = measure(pipe, f"{style} alone", [style], per_digit, seed)
    return out


def merged_for(method: str, loras: list[LoRA], weights: list[float], reduced_rank: int | None = None, **params) -> LoRA:
    rank = reduced_rank if get_method(method).uses_rank and reduced_rank else None
    return merge(loras, weights, method=method, rank=rank, device="cpu", **params)


def load_styles(styles) -> dict[str, LoRA]:
    paths = tw.lora_paths()
    return {s: load(paths[s]) for s in styles}


def mean_images(images: torch.Tensor, per_digit: int) -> np.ndarray:
    """(10, H, W): the first sample of each digit, for grids."""
    return images[::per_digit, 0].numpy()
