"""Readers, writers, naming schemes, architecture entries and key tables of LoRA files."""

from .read import read_lora
from .write import save_lora

__all__ = ["read_lora", "save_lora"]
