"""Detectors: a digit classifier and one hand-made, measurable score per style.

Scores are plain image statistics (no learning), so their meaning is easy to state:
  bold      mean stroke width in pixels, 2 * ink / (ink edge length)
  slanted   shear from second-order moments, -mu11 / mu02 (0 = upright, > 0 leans right)
  shifted   centroid offset towards the upper right corner, in pixels
  small     typical plain-digit radius / the image's radius of gyration (about 1 / scale)
Scores are computed after removing a faint ink floor (see ``clean``). Each has a threshold; a
score above it means "this style is present".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .data import CANVAS, SHIFT


INK_FLOOR = 0.15  # grey below this is treated as paper
PLAIN_RADIUS = 6.5  # median radius of gyration of plain digits, in pixels


def as_batch(images) -> torch.Tensor:
    """Accept (N, H, W), (N, C, H, W) tensors or arrays in [0, 1]; return (N, 1, H, W) grey."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != 1 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # channels-last numpy output of a pipeline
    return x.mean(dim=1, keepdim=True).clamp(0.0, 1.0)


def clean(x: torch.Tensor) -> torch.Tensor:
    """Remove the faint haze a decoder leaves on the paper: moments weigh far pixels heavily,
    so a 1% grey background would otherwise dominate them."""
    return ((x - INK_FLOOR) / (1.0 - INK_FLOOR)).clamp(0.0, 1.0)


def _moments(x: torch.Tensor):
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w)
    mass = x.sum((1, 2, 3)).clamp(min=1e-6)
    cx = (x * xs).sum((1, 2, 3)) / mass
    cy = (x * ys).sum((1, 2, 3)) / mass
    dx, dy = xs - cx.view(-1, 1, 1, 1), ys - cy.view(-1, 1, 1, 1)
    mu11 = (x * dx * dy).sum((1, 2, 3)) / mass
    mu02 = (x * dy * dy).sum((1, 2, 3)) / mass
    mu20 = (x * dx * dx).sum((1, 2, 3)) / mass
    return cx, cy, mu11, mu02, mu20


def stroke_width(x: torch.Tensor) -> torch.Tensor:
    """A stroke of width w and length L has ink w*L and edge length 2*L, so w = 2*ink/edge."""
    ink = x.sum((1, 2, 3))
    edge = (x[..., 1:, :] - x[..., :-1, :]).abs().sum((1, 2, 3))
    edge = edge + (x[..., :, 1:] - x[..., :, :-1]).abs().sum((1, 2, 3))
    return 2.0 * ink / edge.clamp(min=1e-6)


def slant(x: torch.Tensor) -> torch.Tensor:
    """A shear x' = x + s * (cy - y) adds exactly s to this value (y grows downwards)."""
    _, _, mu11, mu02, _ = _moments(x)
    return -mu11 / mu02.clamp(min=1e-6)


def shift_offset(x: torch.Tensor) -> torch.Tensor:
    """Centroid displacement from the canvas centre, projected on the style's shift direction."""
    cx, cy, _, _, _ = _moments(x)
    centre = (CANVAS - 1) / 2.0
    ux, uy = np.array(SHIFT, dtype=np.float64) / np.hypot(*SHIFT)
    return (cx - centre) * float(ux) + (cy - centre) * float(uy)


def smallness(x: torch.Tensor) -> torch.Tensor:
    """Scaling a digit by s scales its radius of gyration by s, so this is about 1 / s."""
    _, _, _, mu02, mu20 = _moments(x)
    return PLAIN_RADIUS / (mu20 + mu02).clamp(min=1e-6).sqrt()


SCORES = {"bold": stroke_width, "slanted": slant, "shifted": shift_offset, "small": smallness}


def style_scores(images, styles=None) -> dict[str, np.ndarray]:
    """{style: score per image} for (N, ...) images in [0, 1]."""
    x = clean(as_batch(images))
    return {s: SCORES[s](x).numpy() for s in (styles or SCORES)}


def roc_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    ranks = np.argsort(np.argsort(np.r_[neg, pos], kind="mergesort"), kind="mergesort") + 1.0
    values = np.r_[neg, pos]
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    rank_sum = ranks[len(neg):].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit_threshold(negative: np.ndarray, positive: np.ndarray) -> float:
    """Midway between the plain digits' 95th and the styled digits' 5th percentile: the middle
    of the gap, so generated images (a bit blurrier than real ones) keep a margin on both sides."""
    return float((np.quantile(negative, 0.95) + np.quantile(positive, 0.05)) / 2.0)


# ---- digit classifier -----------------------------------------------------------------------

class DigitNet(nn.Module):
    """A small CNN: 32x32 grey image -> 10 digit logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path) -> DigitNet:
    from safetensors.torch import load_file

    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def classify(net: DigitNet, images) -> np.ndarray:
    x = as_batch(images)
    return torch.cat([net(chunk).argmax(1) for chunk in x.split(512)]).numpy()


def load_thresholds(path: str | Path) -> dict[str, float]:
    data = json.loads(Path(path).read_text())
    return {style: float(entry["threshold"]) for style, entry in data["styles"].items()}
