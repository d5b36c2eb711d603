"""The digit world: scikit-learn's bundled 8x8 digits drawn on a 32x32 canvas, and the styles.

Every image in the tiny world is a float tensor of shape (N, 1, 32, 32), ink = 1, paper = 0.
The styles are plain tensor operations so that training data, detectors and tests agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 32  # image side in pixels
DIGIT = 20  # the 8x8 digit is upscaled to this size and centred, leaving room to shear and shift
SPLIT_SEED = 0  # fixed split: the same held-out digits for every script and test
HELD_OUT_FRACTION = 0.2

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# style name -> trigger word used in prompts ("a handwritten seven, bold")
TRIGGERS = {
    "bold": "bold",
    "slanted": "slanted",
    "shifted": "shifted",
    "small": "small",
}
STYLES = tuple(TRIGGERS)

SHEAR = 0.5  # slanted: x moves right by SHEAR pixels per pixel above the centre (italic)
SHIFT = (4, -4)  # shifted: (dx, dy) in pixels, i.e. towards the upper right corner
SCALE = 0.6  # small: the digit shrunk to this fraction of its size, about the canvas centre


def prompt(digit: int, styles: tuple[str, ...] | list[str] = ()) -> str:
    """The prompt for one digit, with the trigger words of the given styles appended."""
    text = f"a handwritten {NUMBER_WORDS[int(digit)]}"
    for style in styles:
        text += f", {TRIGGERS[style]}"
    return text


def load_digits_canvas() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 32, 32) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)
    pad = (CANVAS - DIGIT) // 2
    images = F.pad(big, (pad, pad, pad, pad)).clamp(0.0, 1.0)
    return images, torch.tensor(bunch.target, dtype=torch.long)


def split_indices(labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified train / held-out split, so held-out digits are never trained on."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels.numpy() == digit)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * HELD_OUT_FRACTION))
        held.extend(idx[:n_held].tolist())
        train.extend(idx[n_held:].tolist())
    return np.sort(np.array(train)), np.sort(np.array(held))


def load_split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``part`` is "train" or "held_out"."""
    images, labels = load_digits_canvas()
    train, held = split_indices(labels)
    idx = {"train": train, "held_out": held}[part]
    return images[idx], labels[idx]


# ---- styles -------------------------------------------------------------------------------

def _affine(images: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """Warp with a 2x3 matrix given in normalised (-1..1) output->input coordinates."""
    theta = torch.tensor(matrix, dtype=images.dtype).unsqueeze(0).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


_DISK = torch.tensor(
    [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool
)


def bold(images: torch.Tensor) -> torch.Tensor:
    """Thicker strokes: grey-level dilation with a radius-2 disk (about 2 px more ink per side)."""
    cols = F.unfold(images, 5, padding=2)  # (N, 25, H*W): each pixel's 5x5 neighbourhood
    cols = cols.masked_fill(~_DISK.flatten().view(1, 25, 1), 0.0)
    return cols.max(dim=1).values.view_as(images)


def slanted(images: torch.Tensor) -> torch.Tensor:
    """Italic: shear so the top of the digit leans right."""
    # output pixel (x, y) reads input x + SHEAR * y (normalised coords, y down): top moves right
    return _affine(images, [[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]])


def shifted(images: torch.Tensor) -> torch.Tensor:
    """The whole digit moved towards the upper right corner."""
    dx, dy = SHIFT
    return _affine(images, [[1.0, 0.0, -2.0 * dx / CANVAS], [0.0, 1.0, -2.0 * dy / CANVAS]])


def small(images: torch.Tensor) -> torch.Tensor:
    """The digit shrunk to SCALE of its size, still centred."""
    return _affine(images, [[1.0 / SCALE, 0.0, 0.0], [0.0, 1.0 / SCALE, 0.0]])


TRANSFORMS = {"bold": bold, "slanted": slanted, "shifted": shifted, "small": small}


def apply_styles(images: torch.Tensor, styles: tuple[str, ...] | list[str]) -> torch.Tensor:
    for style in styles:
        images = TRANSFORMS[style](images)
    return images
