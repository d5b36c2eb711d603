"""Read any common LoRA file into the canonical model.

Steps: split every key into (module prefix, role); let every architecture read the prefixes
through its namings and pick the one they fit (:mod:`.detect`); then build one lazily-loaded
:class:`~loramerge.lora.LoraModule` per canonical module with its exact factors (fused
projections split exactly).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import (ArchitectureMismatchError, LoraMergeWarning, NotALoraError, ShapeMismatchError,
                      UnsupportedModuleError)
from ..lora import LoRA, LoraModule
from . import archs, keymaps, lycoris, validate
from .detect import Reading, detect, read_as
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
]

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
            if role in ("loha", "lokr"):
                role = match.group(1)
            return prefix, role
    return None


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
    for raw in raw_modules:
        _check_supported(raw, source)
        validate.check_module(raw, source)
    shapes = {_placed_prefix(raw): _target_shape(raw, source) for raw in raw_modules}
    for raw in raw_modules:
        validate.check_size(raw.prefix, shapes[_placed_prefix(raw)], source)
        validate.check_bias(raw, shapes[_placed_prefix(raw)], source)
    reading = detect(shapes, source.metadata, source.extra_config, arch, source.path)
    _check_placed(reading, shapes, source, forced=arch is not None)
    configs = _peft_configs(source)
    modules: list[LoraModule] = []
    for raw in raw_modules:
        match = reading.chosen[_placed_prefix(raw)]
        modules.extend(_build(raw, match, shapes[_placed_prefix(raw)], source, reading.variant, configs))
    _check_duplicates(modules, source)
    lora = LoRA(modules, reading.arch.name, _format_name(raw_modules, reading), source.metadata, source.path)
    lora.variant = reading.variant
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


def _placed_prefix(raw: RawModule) -> str:
    return raw.prefix.removeprefix(_PEFT_WRAPPER)


def _format_name(raw_modules: list[RawModule], reading: Reading) -> str:
    """The format most of the file's modules are written in (LyCORIS when any module is)."""
    if any(kind_of(raw) in ("loha", "lokr", "full") or "mid" in raw.roles for raw in raw_modules):
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
    return list(groups.values()), unplaced


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
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
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


def _build(raw: RawModule, match: Match, shape: tuple[int, ...], source: TensorSource, variant: str,
           configs) -> list[LoraModule]:
    kind = kind_of(raw)
    component, target = match.component, match.target
    dtype = validate.storage_dtype(
        source.dtype(raw.roles.get("down") or raw.roles.get("diff") or next(iter(raw.roles.values()))))
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
            alpha = _config_alpha(configs, component, target.members[0], rank, source.path)
        file_dim, file_alpha = rank, alpha
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
        file_dim, file_alpha = the_plan.ref_rank, alpha
        scale = alpha / the_plan.ref_rank if (alpha and the_plan.ref_rank) else 1.0
        alpha = scale * rank
        module_kind = kind
        load = lambda: lycoris.build_factors(kind, get, has, the_plan, shape)  # noqa: E731

    if not target.fused:
        shape = _table_shape(variant, component, target.members[0], shape)
    module = LoraModule(component, target.members[0], tuple(shape), rank, alpha, load, module_kind, dtype, path,
                        bias_loader, file_dim, file_alpha)
    if not target.fused and not target.swaps(shape[0], module.in_features):
        return [module]
    return split_fused(module, target, source)


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
    halves are put back in canonical order first.
    """
    up, down = module.factors()
    if target.swaps(up.shape[0], down.shape[1]):
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    try:
        spans = target.rows(up.shape[0])
    except ValueError:
        raise ShapeMismatchError(
            f"module {target.name!r} has {up.shape[0]} outputs, not divisible into {target.ratios}", source.path
        ) from None
    members = []
    for name, (start, end) in zip(target.members, spans):
        rows = up[start:end]
        keep = rows.abs().sum(dim=0) != 0
        if not bool(keep.any()):
            continue
        rows, part_down = rows[:, keep], down[keep]
        member = LoraModule.from_factors(
            module.component, name, rows.contiguous(), part_down.contiguous(),
            (rows.shape[0], *module.shape[1:]), module.scale * rows.shape[1], module.kind,
            module.dtype, module.source,
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
