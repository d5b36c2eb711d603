"""Read any common LoRA file into the canonical model.

Steps: split every key into (module prefix, role); resolve each prefix to a provisional
component and a diffusers module name (kohya flattened names, sgm block names, BFL Flux names,
old diffusers attention-processor names, PEFT names); detect the architecture; then build one
lazily-loaded :class:`~loramerge.lora.LoraModule` per module with its exact factors.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import NotALoraError, ShapeMismatchError, UnsupportedModuleError
from ..lora import LoRA, LoraModule
from . import archs, flux, keymaps, lycoris
from .names import is_sgm_name, sgm_to_diffusers, unflatten
from .sources import TensorSource, open_source

# Key endings and the role they play. Regexes so PEFT adapter names (lora_A.default.weight) fit.
_ROLE_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.lora_mid\.weight$"), "mid"),
    (re.compile(r"\.lora_A(\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "bias"),
    (re.compile(r"_lora\.down\.weight$"), "down"),  # old diffusers: attn1.processor.to_q_lora.down.weight
    (re.compile(r"_lora\.up\.weight$"), "up"),
    (re.compile(r"\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"\.lora\.down\.weight$"), "down"),
    (re.compile(r"\.lora\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12])$"), "loha"),
    (re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2)$"), "lokr"),
    (re.compile(r"\.diff$"), "diff"),
    (re.compile(r"\.diff_b$"), "diff_b"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.[^.]+)?(\.weight)?)$"), "dora"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm"),
]

_KOHYA_PREFIXES = (
    ("lora_unet_", "denoiser"),
    ("lora_transformer_", "denoiser"),
    ("lycoris_", "denoiser"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "text_encoder"),
)
_DOTTED_PREFIXES = (
    ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("model.diffusion_model.", "denoiser"),
    ("diffusion_model.", "denoiser"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "te3"),
    ("base_model.model.", None),
)
_UNET_HEADS = {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
               "time_embedding", "add_embedding", "class_embedding", "input_blocks", "middle_block",
               "output_blocks", "time_embed", "label_emb", "out"}
_DIT_HEADS = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
              "time_text_embed", "norm_out", "proj_out", "pos_embed", "double_blocks", "single_blocks",
              "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"}
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class RawModule:
    """All keys of one module as the file names it."""

    prefix: str
    roles: dict[str, str] = field(default_factory=dict)  # role (or LyCORIS suffix) → key
    component: str | None = None  # provisional: unet/transformer/text_encoder*/denoiser/te3
    name: str = ""  # diffusers name (or BFL name when fused)
    fused: flux.FusedTarget | None = None


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_down.weight' → ('lora_unet_x', 'down'); LyCORIS keys keep their suffix."""
    for pattern, role in _ROLE_PATTERNS:
        match = pattern.search(key)
        if match:
            prefix = key[: match.start()]
            if role in ("loha", "lokr"):
                role = match.group(1)
            return prefix, role
    return None


def resolve_prefix(prefix: str) -> tuple[str | None, str, str]:
    """Module prefix → (provisional component, module name, naming scheme)."""
    for kohya, component in _KOHYA_PREFIXES:
        if prefix.startswith(kohya):
            return component, unflatten(prefix[len(kohya):]), "kohya"
    for dotted, component in _DOTTED_PREFIXES:
        if prefix.startswith(dotted):
            name = prefix[len(dotted):]
            return component or infer_component(name), name, "dotted"
    return infer_component(prefix), prefix, "dotted"


def infer_component(name: str) -> str | None:
    head = name.split(".", 1)[0]
    if head in _UNET_HEADS:
        return "unet"
    if head in _DIT_HEADS:
        return "transformer"
    if head in ("text_model", "encoder", "text_projection"):
        return "text_encoder"
    return None


def canonical_name(component: str, name: str) -> tuple[str, str]:
    """(diffusers module name, naming seen) for a module name in any supported scheme."""
    if ".processor." in name:  # old diffusers attention processors
        name = name.replace(".processor.", ".")
    if component not in ("denoiser", "unet", "transformer"):
        last = name.rsplit(".", 1)
        if len(last) == 2 and last[1] in _OLD_TEXT_PROJ and ".self_attn" in name:
            name = f"{last[0]}.{_OLD_TEXT_PROJ[last[1]]}"
        if name.startswith("encoder.layers."):  # transformers ≥ 5 flattened CLIP
            name = "text_model." + name
        return name, "diffusers"
    if name.endswith(".to_out") and ".attn" in name:
        name += ".0"
    if is_sgm_name(name):
        return sgm_to_diffusers(name), "sgm"
    if flux.is_bfl_name(name):
        return name, "bfl"
    return name, "diffusers"


# --------------------------------------------------------------------------------------------


def read_lora(path: str | os.PathLike, arch: str | None = None) -> LoRA:
    source = open_source(path)
    raw_modules, unplaced = _group(source)
    if unplaced:
        shown = ", ".join(unplaced[:6]) + (f" and {len(unplaced) - 6} more" if len(unplaced) > 6 else "")
        if not raw_modules:
            raise NotALoraError(f"not a LoRA: no LoRA keys among {len(source.keys())} tensors ({shown})", source.path)
        raise NotALoraError(f"{len(unplaced)} keys could not be mapped to a LoRA module: {shown}", source.path)
    if not raw_modules:
        raise NotALoraError("not a LoRA: the file holds no tensors", source.path)
    configs = _peft_configs(source)
    hints: set[str] = set()
    shapes_for_detection: dict[tuple[str, str], tuple[int, ...]] = {}
    labels: dict[tuple[str, str], str] = {}
    for raw in raw_modules:
        _check_supported(raw, source)
        naming = _name_module(raw, source)
        hints.add(naming)
        for member, shape in _member_shapes(raw, source):
            shapes_for_detection[(raw.component, member)] = shape
            labels[(raw.component, member)] = raw.prefix
    if arch is None:
        arch = archs.detect(shapes_for_detection, source.path, frozenset(hints), source.metadata, labels)
    spec = archs.spec(arch)
    modules: list[LoraModule] = []
    for raw in raw_modules:
        component = archs.component_for(spec, raw.component)
        if component is None:
            raise NotALoraError(f"module {raw.prefix!r} does not belong to any {spec.label} component", source.path)
        modules.extend(_build(raw, component, source, spec, configs))
    _check_duplicates(modules, source)
    return LoRA(modules, arch, _format_name(hints, source), source.metadata, source.path)


def _format_name(hints: set[str], source: TensorSource) -> str:
    keys = source.keys()
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")) for k in keys):
        lyco = any(split_key(k) and split_key(k)[1].startswith(("hada_", "lokr_", "diff")) for k in keys)
        return "lycoris" if lyco else "kohya"
    if "bfl" in hints:
        return "comfyui"
    return "diffusers"


def _group(source: TensorSource) -> tuple[list[RawModule], list[str]]:
    groups: dict[str, RawModule] = {}
    unplaced: list[str] = []
    for key in source.keys():
        parsed = split_key(key)
        if parsed is None:
            unplaced.append(key)
            continue
        prefix, role = parsed
        raw = groups.setdefault(prefix, RawModule(prefix))
        raw.roles[role] = key
    for raw in groups.values():
        component, name, _ = resolve_prefix(raw.prefix)
        if component is None:
            unplaced.extend(raw.roles.values())
            raw.component = None
        else:
            raw.component, raw.name = component, name
    return [g for g in groups.values() if g.component is not None], unplaced


def _check_supported(raw: RawModule, source: TensorSource) -> None:
    if "dora" in raw.roles:
        raise UnsupportedModuleError(
            f"module {raw.prefix!r} is DoRA (magnitude vector {raw.roles['dora']!r}): its delta depends on "
            "the base weight, so it has no fixed ΔW to merge; fuse it into a base model instead",
            source.path,
        )
    if "norm" in raw.roles:
        raise UnsupportedModuleError(
            f"module {raw.prefix!r} is a LyCORIS norm module (w_norm/b_norm), which has no low-rank form",
            source.path,
        )


def _name_module(raw: RawModule, source: TensorSource) -> str:
    name, naming = canonical_name(raw.component, raw.name)
    raw.name = name
    if naming == "bfl":
        try:
            raw.fused = flux.bfl_target(name)
        except KeyError:
            raise NotALoraError(f"unknown Flux module {raw.prefix!r}", source.path) from None
        raw.component = "transformer" if raw.component == "denoiser" else raw.component
    return naming


def kind_of(raw: RawModule) -> str:
    roles = raw.roles
    if "up" in roles or "down" in roles:
        return "lora"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    return "incomplete"


def _require(raw: RawModule, source: TensorSource, *roles: str) -> None:
    missing = [r for r in roles if r not in raw.roles]
    if missing:
        have = ", ".join(sorted(raw.roles))
        raise NotALoraError(f"module {raw.prefix!r} has {have} but no {', '.join(missing)}", source.path)


def _target_shape(raw: RawModule, source: TensorSource) -> tuple[int, ...]:
    """The shape of the weight this module changes, from tensor shapes alone."""
    shape = {r: source.shape(k) for r, k in raw.roles.items()}
    kind = kind_of(raw)
    if kind == "lora":
        _require(raw, source, "up", "down")
        up, down = shape["up"], shape["down"]
        if up[1] != down[0]:
            raise ShapeMismatchError(
                f"module {raw.prefix!r}: up has rank {up[1]} but down has rank {down[0]}", source.path
            )
        if "mid" in shape:
            return (up[0], down[1], *shape["mid"][2:])
        return (up[0], *down[1:])
    if kind == "loha":
        _require(raw, source, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if "hada_t1" in shape:
            return (shape["hada_w1_a"][1], shape["hada_w1_b"][1], *shape["hada_t1"][2:])
        return (shape["hada_w1_a"][0], *shape["hada_w1_b"][1:])
    if kind == "lokr":
        return _lokr_shape(shape)
    if kind == "full":
        return shape["diff"]
    raise NotALoraError(f"module {raw.prefix!r} has only {', '.join(sorted(raw.roles))}", source.path)


def _lokr_shape(shape: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    def operand(i):
        if f"lokr_w{i}" in shape:
            return shape[f"lokr_w{i}"]
        if i == 2 and "lokr_t2" in shape:
            return (shape["lokr_w2_a"][1], shape["lokr_w2_b"][1], *shape["lokr_t2"][2:])
        a, b = shape[f"lokr_w{i}_a"], shape[f"lokr_w{i}_b"]
        return (a[0], *b[1:])

    w1, w2 = operand(1), operand(2)
    out = w1[0] * w2[0]
    if len(w2) == 4:
        return (out, w1[1] * w2[1], w2[2], w2[3])
    return (out, math.prod(w1[1:]) * math.prod(w2[1:]))


def _member_shapes(raw: RawModule, source: TensorSource):
    shape = _target_shape(raw, source)
    if raw.fused is None:
        return [(raw.name, shape)]
    ratios = raw.fused.ratios
    unit = shape[0] // sum(ratios)
    return [(m, (unit * r, *shape[1:])) for m, r in zip(raw.fused.members, ratios)]


# --------------------------------------------------------------------------------------------
# Alphas from diffusers' lora_adapter_metadata or a PEFT adapter_config.json


def _peft_configs(source: TensorSource) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    raw = source.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError:
            raise NotALoraError("header field lora_adapter_metadata is not valid JSON", source.path) from None
        for key, value in flat.items():
            component, _, field_name = key.partition(".")
            configs.setdefault(component, {})[field_name] = value
    if source.extra_config:
        configs.setdefault("", source.extra_config)
    return configs


def _config_alpha(configs: dict[str, dict], component: str, name: str, rank: int) -> float | None:
    config = configs.get(component) or configs.get("")
    if not config:
        return None
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    if alpha is None:
        return None
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # scale alpha/√r expressed as (alpha·√r)/r
    return float(alpha)


# --------------------------------------------------------------------------------------------


def _file_alpha(raw: RawModule, source: TensorSource) -> float | None:
    if "alpha" not in raw.roles:
        return None
    value = float(source.get(raw.roles["alpha"]).float().reshape(-1)[0])
    if not math.isfinite(value):
        from ..errors import NonFiniteError

        raise NonFiniteError(f"module {raw.prefix!r} has a non-finite alpha", source.path)
    return value


def _build(raw, component, source, spec, configs) -> list[LoraModule]:
    kind = kind_of(raw)
    shape = _target_shape(raw, source)
    dtype = source.dtype(raw.roles.get("down") or raw.roles.get("diff") or next(iter(raw.roles.values())))
    path = str(source.path)
    alpha = _file_alpha(raw, source)

    def get(role: str) -> torch.Tensor:
        return source.get(raw.roles[role]).float()

    def has(role: str) -> bool:
        return role in raw.roles

    bias_loader = (lambda: get("diff_b")) if "diff_b" in raw.roles else None

    if kind == "lora":
        rank = source.shape(raw.roles["down"])[0]
        if alpha is None:
            alpha = _config_alpha(configs, component, raw.name, rank)
        if not alpha:  # a missing or zero alpha means scale 1
            alpha = float(rank)
        module_kind = "lora"
        if has("mid"):
            module_kind = "lora+tucker"
            load = lambda: (get("up"), lycoris.tucker_down(get("mid"), get("down")))  # noqa: E731
        else:
            load = lambda: (source.get(raw.roles["up"]), source.get(raw.roles["down"]))  # noqa: E731
        if "bias" in raw.roles:
            scale = alpha / rank
            bias_loader = lambda: get("bias") * scale  # noqa: E731
    else:
        shapes = {r: source.shape(k) for r, k in raw.roles.items()}
        the_plan = lycoris.plan(kind, shapes, shape)
        rank = the_plan.rank
        scale = alpha / the_plan.ref_rank if (alpha and the_plan.ref_rank) else 1.0
        alpha = scale * rank
        module_kind = kind
        load = lambda: lycoris.build_factors(kind, get, has, the_plan, shape)  # noqa: E731

    shape = _table_shape(spec, component, raw.name, shape) if raw.fused is None else shape
    module = LoraModule(component, raw.name, tuple(shape), rank, alpha, load, module_kind, dtype, path, bias_loader)
    if raw.fused is None:
        return [module]
    return split_fused(module, raw.fused, source)


def _table_shape(spec, component: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Restore a conv kernel's (kh, kw) that a flattened LyCORIS factor does not carry."""
    for variant in spec.variants:
        ref = keymaps.table(variant).get(component, {}).get(name)
        if ref and len(ref) == 4 and len(shape) == 2 and ref[0] == shape[0] and math.prod(ref[1:]) == shape[1]:
            return tuple(ref)
    return shape


def split_fused(module: LoraModule, target: flux.FusedTarget, source: TensorSource) -> list[LoraModule]:
    """Split a BFL fused module's factors into its diffusers members (eager; Flux files only).

    Each member keeps the rows of ``up`` that produce its outputs and the shared ``down``;
    rank components whose up-rows are all zero for a member (kohya's block-diagonal writing)
    contribute nothing to it and are dropped, exactly.
    """
    up, down = module.factors()
    if target.swap_halves:
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    ratios = target.ratios
    if up.shape[0] % sum(ratios):
        raise ShapeMismatchError(
            f"module {target.bfl_name!r} has {up.shape[0]} outputs, not divisible into {ratios}", source.path
        )
    unit = up.shape[0] // sum(ratios)
    members, start = [], 0
    for name, ratio in zip(target.members, ratios):
        rows = up[start : start + unit * ratio]
        start += unit * ratio
        keep = rows.abs().sum(dim=0) != 0
        if not bool(keep.any()):
            continue
        rows, part_down = rows[:, keep], down[keep]
        members.append(LoraModule.from_factors(
            module.component, name, rows.contiguous(), part_down.contiguous(),
            (rows.shape[0], *module.shape[1:]), module.scale * rows.shape[1], module.kind,
            module.dtype, module.source,
        ))
    return members


def _check_duplicates(modules: list[LoraModule], source: TensorSource) -> None:
    seen: set[str] = set()
    for m in modules:
        if m.key in seen:
            raise NotALoraError(f"module {m.key} appears twice under different key names", source.path)
        seen.add(m.key)
