"""Read any common LoRA file into the canonical model.

Steps: split every key into (module prefix, role); let every architecture read the prefixes
through its namings and pick the one they fit (:mod:`.detect`); then build one lazily-loaded
:class:`~loramerge.lora.LoraModule` per canonical module with its exact factors (fused
projections split exactly).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace

import torch

from ..errors import (ArchitectureMismatchError, LoraMergeWarning, NotALoraError, ShapeMismatchError,
                      UnsupportedModuleError)
from ..lora import LoRA, LoraModule
from . import archs, keymaps, lycoris, transforms, validate
from .detect import Reading, detect, named_variant, read_as
from .placement import Match
from .schemes import Target
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
    # LyCORIS types whose change depends on the base weight (see .transforms), and T-LoRA
    (re.compile(r"\.on_input$"), "ia3_on_input"),
    (re.compile(r"\.oft_blocks$"), "oft_blocks"),
    (re.compile(r"\.rescale$"), "oft_rescale"),
    (re.compile(r"\.((a1|a2|b1|b2|bm))\.weight$"), "glora"),
    (re.compile(r"\.(q_layer\.weight|p_layer\.weight|lambda_layer)$"), "tlora"),
    # PEFT's own IA3/OFT/BOFT keys: named on read, not supported
    (re.compile(r"\.(ia3_l|oft_r|oft_R|boft_R|boft_s)(\.[^.]+)?(\.weight)?$"), "peft"),
    # XLabs processors: 'processor.qkv_lora1.down.weight' (tried last: more specific spellings win)
    (re.compile(r"\.down\.weight$"), "down"),
    (re.compile(r"\.up\.weight$"), "up"),
    (re.compile(r"\.weight$"), "ia3_weight"),  # last: LyCORIS IA3's vector (only beside on_input)
]
# The module types loramerge reads apart from plain LoRA, by the roles that mark them.
_LYCORIS_KINDS = ("loha", "lokr", "full", "norm", "ia3", "oft", "glora")

_PEFT_WRAPPER = "base_model.model."  # PEFT's save_pretrained prefixes every key with it


@dataclass
class RawModule:
    """All keys of one module as the file names it."""

    prefix: str
    roles: dict[str, str] = field(default_factory=dict)  # role (or LyCORIS suffix) → key


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_down.weight' → ('lora_unet_x', 'down'); LyCORIS keys keep their suffix."""
    for pattern, role in _ROLE_PATTERNS:
        match = pattern.search(key)
        if match:
            prefix = key[: match.start()]
            if role in ("loha", "lokr", "norm", "tlora", "peft"):
                role = match.group(1)
            elif role == "glora":
                role = "glora_" + match.group(1)
            return prefix, role
    return None


# --------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    """A file's keys grouped into modules and placed on the architecture they fit."""

    source: TensorSource
    raw_modules: list[RawModule]
    shapes: dict[str, tuple[int, ...]]  # placed prefix → the shape of the weight it changes
    reading: Reading
    configs: dict[str, dict]  # lora_adapter_metadata / adapter_config.json, per component

    def match(self, raw: RawModule) -> Match:
        return self.reading.chosen[placed_prefix(raw)]

    def scale(self, raw: RawModule) -> float:
        """The scale s of the module's ΔW = s · (product of its factors) as this reader reads it."""
        kind = kind_of(raw)
        if kind == "lora":
            alpha, rank, _ = _lora_alpha(raw, self.match(raw), self.source, self.configs)
            return alpha / rank
        if kind in ("loha", "lokr", "full"):
            return _lycoris_scale(raw, self.source, self.shapes[placed_prefix(raw)])[0]
        return 1.0  # IA3, OFT/BOFT, GLoRA, norm: no product of factors to scale (a function of the base)


def parse(source: TensorSource, arch: str | None = None) -> Parsed:
    _refuse_foreign(source)
    raw_modules, unplaced = _group(source)
    if unplaced:
        shown = ", ".join(unplaced[:6]) + (f" and {len(unplaced) - 6} more" if len(unplaced) > 6 else "")
        if not raw_modules:
            raise NotALoraError(f"not a LoRA: no LoRA keys among {len(source.keys())} tensors ({shown})", source.path)
        raise NotALoraError(f"{len(unplaced)} keys could not be mapped to a LoRA module: {shown}", source.path)
    if not raw_modules:
        raise NotALoraError("not a LoRA: the file holds no tensors", source.path)
    for raw in raw_modules:
        _check_supported(raw, source)
        validate.check_module(raw, source)
    shapes = {placed_prefix(raw): _target_shape(raw, source) for raw in raw_modules}
    for raw in raw_modules:
        validate.check_size(raw.prefix, shapes[placed_prefix(raw)], source)
        validate.check_bias(raw, shapes[placed_prefix(raw)], source)
    reading = detect(shapes, source.metadata, source.extra_config, arch, source.path)
    _check_placed(reading, shapes, source, forced=arch is not None)
    return Parsed(source, raw_modules, shapes, reading, _peft_configs(source))


def read_lora(path: str | os.PathLike, arch: str | None = None) -> LoRA:
    parsed = parse(open_source(path), arch)
    source, reading = parsed.source, parsed.reading
    modules: list[LoraModule] = []
    for raw in parsed.raw_modules:
        prefix = placed_prefix(raw)
        modules.extend(_build(raw, parsed.match(raw), parsed.shapes[prefix], source, reading.variant, parsed.configs))
    _check_duplicates(modules, source)
    format_name = source.format or _format_name(parsed.raw_modules, reading)
    lora = LoRA(modules, reading.arch.name, format_name, source.metadata, source.path)
    lora.variant = named_variant(reading, source.metadata)  # None: several fit equally, the header names none
    lora.variants = (reading.variant, *reading.also)
    return lora


def _check_placed(reading: Reading, shapes: dict[str, tuple[int, ...]], source: TensorSource,
                  forced: bool = False) -> None:
    """Modules read only up to their layer numbers with a number beyond every variant of the
    architecture: refused for UNets and text encoders (``down_blocks_99`` on SD1 is a broken or
    foreign file); read with a warning for a DiT's ``transformer``, a stack of identical blocks
    that custom models lengthen. Numbers within the variants' ranges (a small UNet laid out
    differently, like the tiny world's) are read as they are."""
    inexact = [p for p, m in reading.chosen.items() if not m.exact]
    if forced and inexact:  # --arch X on a file whose names exist exactly in another architecture
        exact = [a.name for a in archs.registry().values()
                 if a.name != reading.arch.name and not read_as(a, shapes, exact_only=True).misfits]
        if exact:
            raise ArchitectureMismatchError(
                f"is a {' or '.join(exact)} LoRA: every module name exists there, while {len(inexact)} of them "
                f"(e.g. {sorted(inexact)[0]}) exist in no {reading.arch.name} model; give --arch {exact[0]} or none",
                source.path)
    beyond = sorted(p for p in inexact
                    if validate.beyond_tables(reading.arch.name, reading.chosen[p].component,
                                              reading.chosen[p].target.members))
    fixed = [p for p in beyond if reading.chosen[p].component != "transformer"]
    if fixed:
        shown = ", ".join(fixed[:4]) + (f" and {len(fixed) - 4} more" if len(fixed) > 4 else "")
        raise NotALoraError(f"{len(fixed)} modules lie in blocks that no {reading.arch.name} model has: {shown}",
                            source.path)
    if beyond:
        warnings.warn(f"{source.path}: {len(beyond)} modules lie in blocks beyond the largest known "
                      f"{reading.arch.name} model (e.g. {beyond[0]}); read as a longer {reading.arch.name} "
                      "transformer", LoraMergeWarning, stacklevel=3)
    for prefix, shape in shapes.items():
        validate.check_real_shape(prefix, shape, reading, source)


def placed_prefix(raw: RawModule) -> str:
    return raw.prefix.removeprefix(_PEFT_WRAPPER)


def _format_name(raw_modules: list[RawModule], reading: Reading) -> str:
    """The format most of the file's modules are written in (LyCORIS when any module is)."""
    if any(kind_of(raw) in _LYCORIS_KINDS or "mid" in raw.roles for raw in raw_modules):
        return "lycoris"
    labels = collections.Counter(m.naming.label for m in reading.chosen.values())
    return labels.most_common(1)[0][0]


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
    for prefix, raw in list(groups.items()):
        if set(raw.roles) == {"ia3_weight"}:  # a plain '.weight' (a base model's tensor), not IA3
            unplaced.append(raw.roles["ia3_weight"])
            del groups[prefix]
    return list(groups.values()), unplaced


def _refuse_foreign(source: TensorSource) -> None:
    """Files of formats whose content has no ΔW (an architecture entry's ``foreign`` keys)."""
    for spec in archs.registry().values():
        for foreign in spec.foreign:
            pattern = re.compile(foreign.pattern)
            key = next((k for k in source.keys() if pattern.search(k)), None)
            if key is not None:
                raise UnsupportedModuleError(foreign.message.format(key=key), source.path)


def _check_supported(raw: RawModule, source: TensorSource) -> None:
    roles = raw.roles
    if any(r in roles for r in ("q_layer.weight", "p_layer.weight", "lambda_layer")):
        raise UnsupportedModuleError(
            f"module {raw.prefix!r} is T-LoRA: its delta subtracts a truncated SVD of the base weight that the trainer "
            "recomputes at load, and a timestep mask changes it during sampling, so it has no fixed weight-space form; "
            "loramerge does not read it", source.path)
    peft = [r for r in roles if r in ("ia3_l", "oft_r", "oft_R", "boft_R", "boft_s")]
    if peft:
        name = {"ia3_l": "IA3", "oft_r": "OFT", "oft_R": "OFT", "boft_R": "BOFT", "boft_s": "BOFT"}[peft[0]]
        raise UnsupportedModuleError(
            f"module {raw.prefix!r} is PEFT {name} ({peft[0]}); loramerge reads IA3, OFT and BOFT in LyCORIS's format "
            "only", source.path)


def kind_of(raw: RawModule) -> str:
    """The module type by its roles (DoRA is a magnitude beside any of the first four)."""
    roles = raw.roles
    if "up" in roles or "down" in roles:
        return "lora"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    if "w_norm" in roles:
        return "norm"
    if "ia3_on_input" in roles:
        return "ia3"
    if "oft_blocks" in roles:
        return "oft"
    if any(r.startswith("glora_") for r in roles):
        return "glora"
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
    if kind == "norm":
        return shape["w_norm"]
    # base-dependent types: the side their tensors fix (0: the other, from the key tables or the base)
    if kind == "ia3":
        _require(raw, source, "ia3_weight")
        n = math.prod(shape["ia3_weight"])
        return (0, n) if _ia3_on_input(raw, source) else (n, 0)
    if kind == "oft":
        blocks = shape["oft_blocks"]
        if len(blocks) not in (3, 4) or blocks[-1] != blocks[-2]:
            raise ShapeMismatchError(f"module {raw.prefix!r}: oft_blocks of shape {tuple(blocks)} is neither OFT "
                                     "(k, b, b) nor BOFT (m, k, b, b)", source.path)
        return (blocks[-3] * blocks[-1], 0)
    if kind == "glora":
        _require(raw, source, "glora_a1", "glora_a2", "glora_b1", "glora_b2")
        kernel = shape["glora_bm"][2:] if "glora_bm" in shape else shape["glora_b2"][2:]
        return (shape["glora_b1"][0], shape["glora_b2"][1], *kernel)
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


# --------------------------------------------------------------------------------------------
# Alphas from diffusers' lora_adapter_metadata or a PEFT adapter_config.json


def _peft_configs(source: TensorSource) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    raw = source.metadata.get("lora_adapter_metadata")
    if raw is not None:
        try:
            flat = json.loads(raw)
        except (ValueError, RecursionError):
            raise NotALoraError("header field lora_adapter_metadata is not valid JSON", source.path) from None
        if not isinstance(flat, dict):
            raise NotALoraError("header field lora_adapter_metadata is not a JSON object of "
                                f"component.field values (got {type(flat).__name__})", source.path)
        for key, value in flat.items():
            component, _, field_name = key.partition(".")
            configs.setdefault(component, {})[field_name] = value
        for component, config in configs.items():
            validate.check_peft_config(config, f"lora_adapter_metadata ({component})", source.path)
    if source.extra_config is not None:
        configs.setdefault("", source.extra_config)
    return configs


def _config_alpha(configs: dict[str, dict], component: str, name: str, rank: int, path=None) -> float | None:
    config = configs.get(component) or configs.get("")
    if not config:
        return None
    alpha = config.get("lora_alpha")
    if "_alpha_regexes" not in config:  # compiled once per file (hundreds of patterns × modules)
        config["_alpha_regexes"] = [(re.compile(rf"(.*\.)?({pattern})$"), value)
                                    for pattern, value in (config.get("alpha_pattern") or {}).items()]
    for regex, value in config["_alpha_regexes"]:
        if regex.match(name):
            alpha = value
            break
    if alpha is None:
        where = f"lora_adapter_metadata ({component})" if configs.get(component) else "adapter_config.json"
        raise NotALoraError(f"{where} gives no lora_alpha for module {component}.{name}, which has no alpha "
                            "tensor either; its scale is unknown", path)
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # scale alpha/√r expressed as (alpha·√r)/r
    return float(alpha)


# --------------------------------------------------------------------------------------------


def _file_alpha(raw: RawModule, source: TensorSource) -> float | None:
    if "alpha" not in raw.roles:
        return None
    value = float(source.get(raw.roles["alpha"]).double().reshape(-1)[0])
    if not math.isfinite(value):
        from ..errors import NonFiniteError

        raise NonFiniteError(f"module {raw.prefix!r} has a non-finite alpha", source.path)
    return value


def _lora_alpha(raw: RawModule, match: Match, source: TensorSource, configs) -> tuple[float, int, float | None]:
    """(alpha, rank, stated alpha) of a LoRA module: its alpha key, else its adapter config, else
    the rank (a missing or zero alpha means scale 1); the stated alpha is None where none is."""
    rank = source.shape(raw.roles["down"])[0]
    stated = _file_alpha(raw, source)
    if stated is None:
        stated = _config_alpha(configs, match.component, match.target.members[0], rank, source.path)
    return (stated or float(rank)), rank, stated


def _lycoris_scale(raw: RawModule, source: TensorSource, shape: tuple[int, ...]) -> tuple[float, lycoris.Plan]:
    """A LyCORIS module's scale (alpha over the rank LyCORIS divides by, 1 without alpha) and plan."""
    alpha = _file_alpha(raw, source)
    shapes = {r: source.shape(k) for r, k in raw.roles.items()}
    the_plan = lycoris.plan(kind_of(raw), shapes, shape)
    return (alpha / the_plan.ref_rank if (alpha and the_plan.ref_rank) else 1.0), the_plan


def _build(raw: RawModule, match: Match, shape: tuple[int, ...], source: TensorSource, variant: str,
           configs) -> list[LoraModule]:
    kind = kind_of(raw)
    component, target = match.component, match.target
    dtype = validate.storage_dtype(
        source.dtype(raw.roles.get("down") or raw.roles.get("diff") or next(iter(raw.roles.values()))))
    path = str(source.path)

    def get(role: str) -> torch.Tensor:
        return source.get(raw.roles[role]).float()

    def has(role: str) -> bool:
        return role in raw.roles

    bias_role = next((r for r in ("diff_b", "b_norm") if r in raw.roles), None)
    bias_loader = (lambda: get(bias_role).reshape(-1)) if bias_role else None
    alpha = _file_alpha(raw, source)

    if kind in ("ia3", "oft", "glora"):
        return [_base_dependent(raw, kind, component, target, shape, source, variant, alpha, dtype, bias_loader)]
    if kind == "norm" or (kind == "full" and len(shape) == 1):
        return [_vector(raw, component, target, shape, source, dtype, bias_loader)]
    if kind == "lora":
        alpha, rank, stated = _lora_alpha(raw, match, source, configs)
        file_dim, file_alpha = rank, stated
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
        scale, the_plan = _lycoris_scale(raw, source, shape)
        rank = the_plan.rank
        file_dim, file_alpha = the_plan.ref_rank, alpha
        alpha = scale * rank
        module_kind = kind
        load = lambda: lycoris.build_factors(kind, get, has, the_plan, shape)  # noqa: E731

    if not target.fused:
        shape = _table_shape(variant, component, target.members[0], shape)
    module = LoraModule(component, target.members[0], tuple(shape), rank, alpha, load, module_kind, dtype, path,
                        bias_loader, file_dim, file_alpha)
    if "dora" in raw.roles:
        return [_dora(raw, module, target, source)]
    if not target.fused and not target.swaps(shape[0], module.in_features):
        return [module]
    return split_fused(module, target, source)


def _unfused(raw: RawModule, target, source: TensorSource, what: str) -> str:
    """The one canonical module a base-dependent module changes (fused projections refused)."""
    if target.fused or target.swap_halves:
        raise UnsupportedModuleError(
            f"module {raw.prefix!r} is {what} on {target.name!r}, which holds {', '.join(target.members)} in one "
            "weight: its change cannot be split between them exactly; not supported", source.path)
    return target.members[0]


def _dora(raw: RawModule, inner: LoraModule, target, source: TensorSource) -> LoraModule:
    """A DoRA module: the inner module's ΔW and a magnitude m, W' = m ⊙ (W + ΔW)/‖W + ΔW‖ (rows or
    columns, by where the magnitude lies: PEFT's is per output row, LyCORIS's shape says)."""
    _unfused(raw, target, source, "DoRA")
    key = raw.roles["dora"]
    m_shape = source.shape(key)
    shape = inner.shape
    if "lora_magnitude_vector" in key or (m_shape and m_shape[0] == shape[0] and math.prod(m_shape) == shape[0]):
        axis = 0
    elif len(m_shape) >= 2 and m_shape[0] == 1 and len(shape) > 1 and math.prod(m_shape) == shape[1]:
        axis = 1
    else:
        raise ShapeMismatchError(f"module {raw.prefix!r}: DoRA magnitude {key!r} has shape {tuple(m_shape)}, "
                                 f"which fits neither the rows nor the input channels of {tuple(shape)}", source.path)
    if math.prod(m_shape) != shape[axis]:
        raise ShapeMismatchError(f"module {raw.prefix!r}: DoRA magnitude {key!r} has {math.prod(m_shape)} values for "
                                 f"{shape[0]} output rows", source.path)
    load = lambda: {"delta": inner.delta(), "magnitude": source.get(key).float().reshape(-1)}  # noqa: E731
    return replace(inner, kind=inner.kind + "+dora",
                   transform=transforms.Transform("dora", load, functools.partial(transforms.dora, axis=axis)))


def _ia3_on_input(raw: RawModule, source: TensorSource) -> bool:
    return bool(source.get(raw.roles["ia3_on_input"]).reshape(-1)[0])


def _base_dependent(raw: RawModule, kind: str, component: str, target, shape, source: TensorSource, variant: str,
                    alpha: float | None, dtype, bias_loader) -> LoraModule:
    """IA3, OFT/BOFT, GLoRA: a module whose new weight is a formula of the base weight."""
    shapes = {r: source.shape(k) for r, k in raw.roles.items()}
    if kind == "oft" and len(shapes["oft_blocks"]) == 4:
        kind = "boft"
    label = {"ia3": "IA3", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA"}[kind]
    name = _unfused(raw, target, source, label)
    if kind != "glora":  # the tensors fix one side; the key table gives the other, else the base will
        ref = keymaps.table(variant).get(component, {}).get(name)
        axis = 1 if kind == "ia3" and shape[0] == 0 else 0
        if ref is not None and len(ref) > 1 and ref[axis] == max(shape):
            shape = tuple(ref)
    roles = raw.roles

    def load() -> dict[str, torch.Tensor]:
        tensors = {role.removeprefix("glora_").removeprefix("oft_"): source.get(key).float()
                   for role, key in roles.items() if role not in ("alpha", "ia3_on_input", "diff_b", "b_norm")}
        if "ia3_weight" in tensors:
            tensors = {"scale": tensors["ia3_weight"].reshape(-1)}
        return tensors

    if kind == "ia3":
        formula = functools.partial(transforms.ia3, axis=1 if _ia3_on_input(raw, source) else 0)
    elif kind in ("oft", "boft"):
        blocks = shapes["oft_blocks"]
        if kind == "boft" and not transforms.boft_rows_ok(shape[0], blocks[0], blocks[-1]):
            raise ShapeMismatchError(f"module {raw.prefix!r}: BOFT blocks {tuple(blocks)} do not fit {shape[0]} rows",
                                     source.path)
        formula = functools.partial(transforms.oft if kind == "oft" else transforms.boft,
                                    constraint=(alpha or 0.0) * shape[0])
    else:
        r = shapes["glora_a2"][0]
        formula = functools.partial(transforms.glora, scale=(alpha or r) / r)
    rank = transforms.full_rank(shape) or max(shape)
    file_dim = shapes["glora_a2"][0] if kind == "glora" else None
    return LoraModule(component, name, tuple(shape), rank, float(rank), _no_factors, kind, dtype, str(source.path),
                      bias_loader, file_dim, alpha, transform=transforms.Transform(kind, load, formula))


def _no_factors():
    raise AssertionError("a base-dependent module has no factors")  # LoraModule.factors refuses first


def _vector(raw: RawModule, component: str, target, shape, source: TensorSource, dtype, bias_loader) -> LoraModule:
    """A 1-D delta on a parameter (LyCORIS ``diff``/``w_norm`` on a norm layer's weight)."""
    name = _unfused(raw, target, source, "a norm-weight delta")
    role = "diff" if "diff" in raw.roles else "w_norm"
    n = shape[0]
    load = lambda: (source.get(raw.roles[role]).float().reshape(n, 1), torch.ones(1, 1))  # noqa: E731
    return LoraModule(component, name, (n,), 1, 1.0, load, "norm", dtype, str(source.path), bias_loader)


def _table_shape(variant: str, component: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Restore a conv kernel's (kh, kw) that a flattened LyCORIS factor does not carry."""
    ref = keymaps.table(variant).get(component, {}).get(name)
    if ref and len(ref) > 2 and len(shape) == 2 and ref[0] == shape[0] and math.prod(ref[1:]) == shape[1]:
        return tuple(ref)
    return shape


def split_fused(module: LoraModule, target: Target, source: TensorSource) -> list[LoraModule]:
    """Split a fused module's factors into its canonical members (eager), exactly.

    Each member keeps the rows of ``up`` that produce its outputs and the shared ``down``;
    rank components whose up-rows are all zero for a member (a block-diagonal up, as kohya
    writes fused modules) contribute nothing to it and are dropped, exactly. Swapped output
    halves are put back in canonical order first; a bias delta is split by the same rows.
    """
    up, down = module.factors()
    bias = module.bias_delta()
    if target.swaps(up.shape[0], down.shape[1]):
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
        if bias is not None:
            shift, scale = bias.chunk(2, dim=0)
            bias = torch.cat([scale, shift], dim=0)
    try:
        spans = target.rows(up.shape[0])
    except ValueError:
        raise ShapeMismatchError(
            f"module {target.name!r} has {up.shape[0]} outputs, not divisible into {target.ratios}", source.path
        ) from None
    if bias is not None and bias.shape[0] != up.shape[0]:
        raise ShapeMismatchError(f"module {target.name!r}: bias delta has {bias.shape[0]} values for "
                                 f"{up.shape[0]} outputs", source.path)
    members = []
    for name, (start, end) in zip(target.members, spans):
        rows = up[start:end]
        part_bias = None if bias is None else bias[start:end].contiguous()
        if part_bias is not None and not bool(part_bias.any()):
            part_bias = None
        keep = rows.abs().sum(dim=0) != 0
        if not bool(keep.any()):
            if part_bias is None:
                continue
            keep = torch.zeros_like(keep)
            keep[0] = True  # a member with a bias delta only: one (zero) rank component
        rows, part_down = rows[:, keep], down[keep]
        member = LoraModule.from_factors(
            module.component, name, rows.contiguous(), part_down.contiguous(),
            (rows.shape[0], *module.shape[1:]), module.scale * rows.shape[1], module.kind,
            module.dtype, module.source, part_bias,
        )
        member.file_dim, member.file_alpha = module.file_dim, module.file_alpha
        members.append(member)
    return members


def _check_duplicates(modules: list[LoraModule], source: TensorSource) -> None:
    seen: set[str] = set()
    for m in modules:
        if m.key in seen:
            raise NotALoraError(f"module {m.key} appears twice under different key names", source.path)
        seen.add(m.key)
