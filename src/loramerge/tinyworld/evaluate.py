"""Measurements shared by the training scripts and the tests."""

from __future__ import annotations

import numpy as np

from . import classify, digit_prompts, generate, style_hits


def digit_accuracy(pipe, per_digit: int = 10, seed: int = 0, styles=(), classifier_path=None, **gen_kwargs) -> dict:
    """How often the classifier reads the prompted digit in generated images."""
    prompts, digits = digit_prompts(per_digit, styles)
    images = generate(pipe, prompts, seed=seed, **gen_kwargs)
    pred = classify(images, classifier_path)
    per = {str(d): float((pred[digits == d] == d).mean()) for d in range(10)}
    return {"accuracy": float((pred == digits).mean()), "per_digit": per, "images": images}


def style_hit_rate(pipe, style: str, per_digit: int = 10, seed: int = 0, **gen_kwargs) -> dict:
    """Share of images (prompted with the style's trigger word) whose score passes the threshold."""
    prompts, digits = digit_prompts(per_digit, [style])
    images = generate(pipe, prompts, seed=seed, **gen_kwargs)
    hits = style_hits(images, [style])[style]
    pred = classify(images)
    return {"hit_rate": float(hits.mean()), "digit_accuracy": float((pred == digits).mean()), "images": images}


def rounded(d: dict, digits: int = 4) -> dict:
    """Drop tensors and round floats, for report.json."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = rounded(v, digits)
        elif isinstance(v, (float, np.floating)):
            out[k] = round(float(v), digits)
        elif isinstance(v, (int, str, bool)):
            out[k] = v
    return out
