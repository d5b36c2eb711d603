"""`loramerge generate`: a labelled grid from a local pipeline, columns over weights or methods."""

import subprocess
import sys

import numpy as np
from PIL import Image

from loramerge import tinyworld as tw


def test_grid_over_weights_and_methods(tmp_path):
    base = tw.paths.pipeline_dir()
    bold, slanted = tw.lora_paths()["bold"], tw.lora_paths()["slanted"]
    cmd = [sys.executable, "-m", "loramerge", "generate", "--base", str(base), "--lora", f"{bold}:1.0",
           "--prompt", "a handwritten seven, bold", "--prompt", "a handwritten two, bold",
           "--grid", "weight=0,1", "--steps", "4", "-o", str(tmp_path / "weights.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "weights.png").convert("L"), dtype=np.float32)
    label_w, label_h, cell = 160, 24, 128
    assert grid.shape == (label_h + 2 * cell, label_w + 2 * cell)
    off, on = grid[label_h:, label_w:label_w + cell], grid[label_h:, label_w + cell:]
    assert np.abs(off - on).mean() > 1.0  # weight 0 and weight 1 draw different digits

    cmd = [sys.executable, "-m", "loramerge", "generate", "--base", str(base), "--lora", f"{bold}:1.0",
           "--lora", f"{slanted}:1.0", "--prompt", "a handwritten four, bold, slanted",
           "--grid", "method=linear,ties", "--steps", "4", "-o", str(tmp_path / "methods.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "methods.png").size == (160 + 2 * 128, 24 + 128)
    bad = [sys.executable, "-m", "loramerge", "generate", "--base", str(base), "--lora", f"{bold}:1.0",
           "--prompt", "a handwritten four", "--grid", "method=tiess", "-o", str(tmp_path / "x.png")]
    proc = subprocess.run(bad, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown merge method 'tiess'" in proc.stderr
    assert not (tmp_path / "x.png").exists()
