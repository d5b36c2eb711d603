"""Readers, writers and key maps of LoRA file formats."""

from .read import read_lora
from .write import FORMATS, save_lora

__all__ = ["read_lora", "save_lora", "FORMATS"]
