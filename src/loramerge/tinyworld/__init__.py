"""A tiny but real text-to-image world: a diffusers Stable Diffusion pipeline trained from scratch
on scikit-learn's handwritten digits, style LoRAs in kohya format, and detectors that score them.

Typical use (what the demo and the composition benchmark do)::

    from loramerge import tinyworld as tw
    pipe = tw.load_pipeline()
    pipe.load_lora_weights(str(tw.lora_paths()["bold"]))
    prompts, digits = tw.digit_prompts(per_digit=10, styles=["bold"])
    images = tw.generate(pipe, prompts, seed=0)
    accuracy = (tw.classify(images) == digits).mean()
    hit_rate = tw.style_hits(images)["bold"].mean()
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from . import paths
from .data import NUMBER_WORDS, STYLES, TRIGGERS, prompt

# generation defaults: DPM-Solver++ needs few steps on 8x8 latents; mild guidance (2.5) keeps the
# digits legible (100% in report.json) without overriding the style LoRAs
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 2.5

__all__ = [
    "STYLES", "NUMBER_WORDS", "prompt", "digit_prompts", "load_pipeline", "lora_paths", "trigger_words",
    "generate", "classify", "style_scores", "thresholds", "style_hits", "report",
]


def load_pipeline(path: str | Path | None = None):
    """The shipped StableDiffusionPipeline (CPU, float32), loaded offline from a local folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or paths.pipeline_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_paths() -> dict[str, Path]:
    """{style: kohya .safetensors file} for the shipped style LoRAs."""
    return {style: paths.lora_path(style) for style in STYLES}


def trigger_words() -> dict[str, str]:
    return dict(TRIGGERS)


def digit_prompts(per_digit: int, styles=()) -> tuple[list[str], np.ndarray]:
    """``per_digit`` prompts for each digit 0-9 (with the styles' trigger words) and the digits."""
    digits = np.repeat(np.arange(10), per_digit)
    return [prompt(d, list(styles)) for d in digits], digits


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, **kwargs):
    """Grey images as a float tensor (N, 1, 32, 32) in [0, 1]; fixed seed -> same images.
    Extra keyword arguments go to the pipeline (e.g. ``cross_attention_kwargs``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                   output_type="pt", **kwargs)
    return out.images.mean(dim=1, keepdim=True).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _classifier(path: str):
    from .detectors import load_classifier

    return load_classifier(path)


def classify(images, classifier_path: str | Path | None = None) -> np.ndarray:
    """Predicted digit (0-9) per image."""
    from .detectors import classify as run

    return run(_classifier(str(classifier_path or paths.classifier_path())), images)


def style_scores(images, styles=None) -> dict[str, np.ndarray]:
    """{style: score per image}; a score above ``thresholds()[style]`` means the style is there."""
    from .detectors import style_scores as scores

    return scores(images, styles)


def thresholds(path: str | Path | None = None) -> dict[str, float]:
    from .detectors import load_thresholds

    return load_thresholds(path or paths.detectors_json())


def style_hits(images, styles=None) -> dict[str, np.ndarray]:
    """{style: boolean per image}: did the detector see the style?"""
    limits = thresholds()
    return {s: v > limits[s] for s, v in style_scores(images, styles).items()}


def report() -> dict:
    """The numbers measured by the training scripts (assets/report.json)."""
    return json.loads(paths.report_path().read_text())
