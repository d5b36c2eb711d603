"""cloneofsimo/lora, the first LoRA format for Stable Diffusion (2022–23; SD1.x/2.x).

Its files name no module: a ``.pt`` holds a list ``[up₀, down₀, up₁, down₁, …]``, a
``.safetensors`` ("safeloras") keys ``unet:{i}:up`` / ``text_encoder:{i}:down`` with the target
classes in the header (``"unet": '["CrossAttention", "Attention", "GEGLU"]'``). Entry ``i`` is the
i-th Linear found walking the model: every transformer block of the UNet in module order
(down blocks, up blocks, then the mid block), inside each block ``attn1`` q, k, v, out, the
GEGLU ``ff.net.0.proj``, then ``attn2`` — the registration order of diffusers ≤ 0.11, which
trained these files (later diffusers registers ``attn2`` before ``ff``; both orders are tried);
the text encoder's layers with ``self_attn`` k, v, q, out (CLIPAttention's order). No alpha: the
scale is baked into ``up``. A file is read only when exactly one architecture and order fits
every entry's shape; ResNet ("extended") targets and textual-inversion embeddings are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import NotALoraError, UnsupportedModuleError
from . import keymaps

KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
FORMAT = "cloneofsimo"
_KNOWN_TARGETS = {"unet": {"CrossAttention", "Attention", "GEGLU"}, "text_encoder": {"CLIPAttention"}}
_ARCH_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?attentions\.(\d+)\.transformer_blocks\.(\d+)\."
                    r"(attn1\.to_(?:q|k|v|out\.0)|attn2\.to_(?:q|k|v|out\.0)|ff\.net\.0\.proj)$")
_TEXT = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(k|v|q|out)_proj$")
_IN_BLOCK = {"old": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]}
_IN_BLOCK["new"] = _IN_BLOCK["old"][:4] + _IN_BLOCK["old"][5:] + _IN_BLOCK["old"][4:5]
_CONTAINERS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def is_cloneofsimo(keys) -> bool:
    keys = list(keys)
    return bool(keys) and any(KEY.match(k) for k in keys)


def unet_order(variant: str, order: str) -> list[tuple[str, tuple[int, ...]]]:
    """The UNet modules a cloneofsimo file lists, in its order, with their weight shapes."""
    table = keymaps.table(variant)["unet"]
    found = []
    for name, shape in table.items():
        m = _BLOCK.match(name)
        if m:
            container, block, attention, tblock, inner = m.groups()
            found.append(((_CONTAINERS[container], int(block or 0), int(attention), int(tblock),
                           _IN_BLOCK[order].index(inner)), name, shape))
    return [(name, shape) for _, name, shape in sorted(found)]


def text_order(variant: str) -> list[tuple[str, tuple[int, ...]]]:
    table = keymaps.table(variant)["text_encoder"]
    found = []
    for name, shape in table.items():
        m = _TEXT.match(name)
        if m:
            found.append(((int(m.group(1)), "kvqo".index(m.group(2)[0])), name, shape))
    return [(name, shape) for _, name, shape in sorted(found)]


def _fits(entries: list[tuple[torch.Size, torch.Size]], modules: list[tuple[str, tuple[int, ...]]]) -> bool:
    if len(entries) != len(modules):
        return False
    return all(up[0] == shape[0] and down[1:].numel() == _cols(shape) and up[1] == down[0]
               for (up, down), (_, shape) in zip(entries, modules))


def _cols(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _place(model: str, entries, path) -> tuple[str, list[str]]:
    """(architecture, module names) for one model's entries: the only fitting (arch, order)."""
    fits = []
    for arch in ("sd1", "sd2"):
        orders = [unet_order(arch, o) for o in ("old", "new")] if model == "unet" else [text_order(arch)]
        fits += [(arch, [n for n, _ in modules]) for modules in orders if _fits(entries, modules)]
    if len(fits) != 1:
        why = "no" if not fits else "more than one"
        raise NotALoraError(f"cloneofsimo lora format: its {len(entries)} unnamed {model} entries fit {why} known "
                            "SD1/SD2 module order, so which module each one changes is not known", path)
    return fits[0]


def to_canonical(path: Path, tensors: dict[str, torch.Tensor] | list, metadata: dict[str, str],
                 model: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's entries renamed to canonical PEFT keys (``unet.<name>.lora_A.weight``), and its
    header with the architecture they fit."""
    if isinstance(tensors, list):  # .pt: one model's [up, down, …]; the text encoder's file says so in its name
        if len(tensors) % 2:
            raise NotALoraError("cloneofsimo lora format: an odd number of tensors (ups and downs come in pairs)", path)
        model = model or ("text_encoder" if path.name.endswith(".text_encoder.pt") else "unet")
        tensors = {f"{model}:{i // 2}:{'up' if i % 2 == 0 else 'down'}": t for i, t in enumerate(tensors)}
    entries: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        m = KEY.match(key)
        if not m:
            raise UnsupportedModuleError(f"cloneofsimo lora format: {key!r} is not a LoRA entry (a textual-inversion "
                                         "embedding has no ΔW to merge)", path)
        entries.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
    out: dict[str, torch.Tensor] = {}
    arch_of = set()
    for model_name, by_index in entries.items():
        targets = metadata.get(model_name)
        if targets:
            try:
                classes = set(json.loads(targets))
            except (json.JSONDecodeError, TypeError):
                classes = set()
            extra = classes - _KNOWN_TARGETS[model_name]
            if extra:
                raise UnsupportedModuleError(f"cloneofsimo lora format: {model_name} targets {sorted(extra)} besides "
                                             "attention and GEGLU, whose module order is not known", path)
        if sorted(by_index) != list(range(len(by_index))) or any(set(e) != {"up", "down"} for e in by_index.values()):
            raise NotALoraError(f"cloneofsimo lora format: {model_name} entries are not numbered 0…n with an up and a "
                                "down each", path)
        ordered = [(by_index[i]["up"], by_index[i]["down"]) for i in range(len(by_index))]
        arch, names = _place(model_name, [(u.shape, d.shape) for u, d in ordered], path)
        arch_of.add(arch)
        for name, (up, down) in zip(names, ordered):
            out[f"{model_name}.{name}.lora_A.weight"] = down
            out[f"{model_name}.{name}.lora_B.weight"] = up
    if len(arch_of) > 1:
        raise NotALoraError("cloneofsimo lora format: the UNet entries fit SD1 but the text encoder's SD2 (or the "
                            "other way round)", path)
    meta = {k: v for k, v in metadata.items() if not re.match(r"^(unet|text_encoder)(:\d+:rank)?$", k)}
    meta.setdefault("ss_base_model_version", _ARCH_VERSION[arch_of.pop()])
    return out, meta
