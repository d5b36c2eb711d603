"""Forge's LoRA loader (``extensions-builtin/sd_forge_lora/networks.py`` ``load_lora_for_models``
over ``packages_3rdparty/comfyui_lora_collection``), restated from
lllyasviel/stable-diffusion-webui-forge dfdcbab (2025-06-26); notes §2.

A mid-2024 copy of ComfyUI's loader: the same candidates and scales, five LoRA spellings (no
``.default.`` adapter names), and one rule of its own: when more than 12 keys are left unused
after the UNet and text-encoder passes, the whole file is skipped ("LoRA version mismatch").
"""

from __future__ import annotations

from .comfyui import LORA_SPELLINGS, ComfyUI


class Forge(ComfyUI):
    spellings = LORA_SPELLINGS[:5]
    leftover_limit = 12


CLIENT = Forge("forge", "Forge", "lllyasviel/stable-diffusion-webui-forge dfdcbab (2025-06-26)")
