"""Writers: kohya format (what A1111, Forge and ComfyUI load; sgm names for SDXL, BFL names for
Flux, diffusers names for SD1/SD2 — as kohya sd-scripts writes them) and diffusers/PEFT format
with ``lora_adapter_metadata`` so per-module ranks and alphas survive a round trip.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..errors import LoraMergeError, UsageError
from ..lora import LoRA, LoraModule, all_finite
from . import archs, flux
from .names import diffusers_to_sgm, flatten
from .safetensors_io import save_file

FORMATS = ("kohya", "diffusers")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
# Header fields that describe a file's bytes or layout; never carried over to a new file.
_STALE_FIELDS = {"format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash",
                 "modelspec.hash_sha256", "ss_network_dim", "ss_network_alpha", "ss_network_args"}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None


def save_lora(lora: LoRA, path, format: str = "kohya", dtype=None, metadata: dict[str, str] | None = None):
    """Write ``lora`` to ``path`` atomically. ``metadata`` adds or overrides header fields."""
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; use {' or '.join(FORMATS)}")
    dtype = resolve_dtype(dtype) or lora.dtype
    spec = archs.spec(lora.arch)
    if format == "kohya":
        tensors = kohya_tensors(lora, spec, dtype)
    else:
        tensors = diffusers_tensors(lora, dtype)
    header = build_header(lora, spec, format, metadata)
    save_file(path, tensors, header)


def _storage_factors(module: LoraModule, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) laid out as the target layer stores them: conv factors are 4-D."""
    up, down = module.load()
    up = up.reshape(module.out_features, module.rank)
    down = down.reshape(module.rank, module.in_features)
    if module.is_conv:
        up = up.reshape(*up.shape, 1, 1)
        down = down.reshape(module.rank, *module.shape[1:])
    if not (all_finite(up) and all_finite(down)):
        from ..errors import NonFiniteError

        raise NonFiniteError(f"module {module.key} holds NaN or Inf values", module.source)
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# kohya


def kohya_name(spec: archs.ArchSpec, module: LoraModule) -> str:
    prefix = spec.kohya_prefix.get(module.component)
    if prefix is None:
        raise LoraMergeError(f"{spec.label} has no kohya prefix for component {module.component!r}")
    name = module.name
    if module.component == "unet" and spec.kohya_naming == "sgm":
        name = diffusers_to_sgm(name, spec.unet_layout)
    return prefix + flatten(name)


def kohya_tensors(lora: LoRA, spec: archs.ArchSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    fused_groups: dict[str, dict[int, LoraModule]] = collections.defaultdict(dict)
    targets: dict[str, flux.FusedTarget] = {}
    for module in lora:
        if module.component == "transformer" and spec.kohya_naming == "bfl":
            try:
                target, position = flux.diffusers_to_bfl(module.name)
            except KeyError:
                raise LoraMergeError(f"module {module.key} has no Flux (BFL) name for kohya format") from None
            fused_groups[target.bfl_name][position] = module
            targets[target.bfl_name] = target
            continue
        up, down = _storage_factors(module, dtype)
        _put_kohya(tensors, kohya_name(spec, module), up, down, module.alpha, module.bias_delta(), dtype)
    outside_blocks = sorted(n for n in fused_groups if not n.startswith(("double_blocks", "single_blocks")))
    if outside_blocks:
        warnings.warn(
            f"kohya-format Flux modules outside the blocks ({', '.join(outside_blocks)}) load in ComfyUI and "
            "sd-scripts, but diffusers (≤ 0.42) drops them silently; write --format diffusers for diffusers",
            stacklevel=3,
        )
    for bfl_name, members in fused_groups.items():
        up, down, alpha = fuse_members(targets[bfl_name], members, dtype)
        key = spec.kohya_prefix["transformer"] + flatten(bfl_name)
        _put_kohya(tensors, key, up, down, alpha, None, dtype)
    return tensors


def _put_kohya(tensors, key, up, down, alpha, bias, dtype) -> None:
    tensors[f"{key}.lora_up.weight"] = up
    tensors[f"{key}.lora_down.weight"] = down
    tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if bias is not None:
        tensors[f"{key}.diff_b"] = bias.to(dtype).contiguous()


def fuse_members(target: flux.FusedTarget, members: dict[int, LoraModule], dtype: torch.dtype):
    """One BFL module's (up, down, alpha) from its diffusers members, exactly.

    Members sharing one down factor and one scale (what a split kohya file gives back) stack
    their up factors at the original rank; otherwise the up factor is block-diagonal over the
    members' ranks (rows of absent members are zero), with every scale folded in (alpha = rank).
    """
    ratios = target.ratios
    some = next(iter(members.values()))
    unit = some.out_features // ratios[next(iter(members))]
    if len(target.members) == 1:
        up, down = _storage_factors(some, dtype)
        if target.swap_halves:
            scale, shift = up.chunk(2, dim=0)
            up = torch.cat([shift, scale], dim=0)
        return up, down, some.alpha
    factors = {p: m.factors() for p, m in members.items()}
    same = (
        len(members) == len(target.members)
        and len({(m.rank, m.alpha) for m in members.values()}) == 1
        and all(torch.equal(factors[p][1], factors[0][1]) for p in factors)
    )
    if same:
        up = torch.cat([factors[p][0] for p in range(len(target.members))], dim=0)
        return up.to(dtype), factors[0][1].to(dtype), some.alpha
    total_rank = sum(m.rank for m in members.values())
    up = torch.zeros(unit * sum(ratios), total_rank)
    downs, col, row = [], 0, 0
    for position, ratio in enumerate(ratios):
        rows = unit * ratio
        if position in members:
            m_up, m_down = factors[position]
            r = m_up.shape[1]
            up[row : row + rows, col : col + r] = m_up * members[position].scale
            downs.append(m_down)
            col += r
        row += rows
    return up.to(dtype), torch.cat(downs, dim=0).to(dtype), float(total_rank)


# --------------------------------------------------------------------------------------------
# diffusers / PEFT


def diffusers_tensors(lora: LoRA, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for module in lora:
        up, down = _storage_factors(module, dtype)
        tensors[f"{module.key}.lora_A.weight"] = down
        tensors[f"{module.key}.lora_B.weight"] = up
        bias = module.bias_delta()
        if bias is not None:  # PEFT scales lora_B's bias like its weight
            tensors[f"{module.key}.lora_B.bias"] = (bias / module.scale).to(dtype).contiguous()
    return tensors


def _peft_target(name: str) -> str:
    """A module name as a PEFT target/pattern. PEFT matches a target as a dotted suffix, so
    'encoder.layers.0.…' finds CLIP layers whether transformers nests them under
    ``text_model`` (< 5) or not (≥ 5); the full 'text_model.…' would miss the latter."""
    return name.removeprefix("text_model.")


def adapter_metadata(lora: LoRA) -> dict:
    """diffusers' ``lora_adapter_metadata``: a LoraConfig per component, keys prefixed."""
    flat = {}
    for component in lora.components:
        mods = [m for m in lora if m.component == component]
        r = collections.Counter(m.rank for m in mods).most_common(1)[0][0]
        alpha = collections.Counter(m.alpha for m in mods).most_common(1)[0][0]
        config = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {_peft_target(m.name): m.rank for m in mods if m.rank != r},
            "alpha_pattern": {_peft_target(m.name): m.alpha for m in mods if m.alpha != alpha},
            "target_modules": sorted(_peft_target(m.name) for m in mods),
            "use_dora": False,
            "use_rslora": False,
            "lora_bias": any(m.bias is not None for m in mods),
        }
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    return flat


# --------------------------------------------------------------------------------------------
# header


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def build_header(lora: LoRA, spec: archs.ArchSpec, format: str, extra: dict[str, str] | None) -> dict[str, str]:
    header = {k: v for k, v in lora.metadata.items() if k not in _STALE_FIELDS}
    ranks = {m.rank for m in lora}
    alphas = {m.alpha for m in lora}
    header.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": _number(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": spec.ss_base_model_version,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": spec.modelspec_architecture,
        "modelspec.implementation": "diffusers" if format == "diffusers" else spec.modelspec_implementation,
        "modelspec.resolution": header.get("modelspec.resolution", spec.resolution),
        "loramerge.version": __version__,
    })
    header.setdefault("modelspec.title", lora.path.stem if lora.path else "loramerge")
    if format == "diffusers":
        header["format"] = "pt"
        header["lora_adapter_metadata"] = json.dumps(adapter_metadata(lora), indent=2, sort_keys=True)
    for key, value in (extra or {}).items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = str(value)
    return header


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one existing file (so an input is never overwritten)."""
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False
