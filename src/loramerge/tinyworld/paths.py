"""Where the shipped tiny-world assets live (inside the installed package)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def pipeline_dir(root: Path = ASSETS) -> Path:
    return root / "pipeline"


def lora_path(style: str, root: Path = ASSETS) -> Path:
    return root / "loras" / f"{style}.safetensors"


def classifier_path(root: Path = ASSETS) -> Path:
    return root / "detectors" / "classifier.safetensors"


def detectors_json(root: Path = ASSETS) -> Path:
    return root / "detectors" / "detectors.json"


def report_path(root: Path = ASSETS) -> Path:
    return root / "report.json"
