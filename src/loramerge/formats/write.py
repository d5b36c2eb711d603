"""Writers: every architecture's output formats (:attr:`Architecture.formats`), so files load
exactly in the clients people use.

Scales are folded so a file's meaning does not depend on how a reader finds alphas:
- kohya files (lora_down/lora_up/.alpha): one alpha for every module of the file; each
  module's own scale is folded into its up factor (ΔW unchanged). diffusers' SDXL kohya
  converter, for one, looks some alphas up under the wrong names and falls back to the most
  common one — a file with one alpha is read exactly by every client.
- PEFT-style files (lora_A/lora_B): the scale is folded in completely (alpha = rank), so
  ΔW = lora_B @ lora_A with or without ``lora_adapter_metadata`` (ComfyUI reads none); the
  metadata is still written and agrees.
All folding happens in float32 before the one cast to the output dtype; what is written is
checked for finiteness after the cast.

Groups some client applies all-or-nothing (A1111's OpenCLIP attention: q, k, v and out of a
layer) are completed with zero modules in kohya-named files. Before a file is written, ``check``
reads the tensors as every client would; where a client would not load them exactly, one
:class:`~loramerge.errors.ClientWarning` line names it and the format that loads there.
"""

from __future__ import annotations

import collections
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..version import __version__
from ..errors import ClientWarning, LoraMergeError, NonFiniteError, UsageError
from ..lora import LoRA, LoraModule, all_finite
from . import archs
from .archs import Architecture, Naming
from .safetensors_io import save_file
from .schemes import Target, flatten

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
# Header fields that describe a file's bytes or layout; never carried over to a new file.
_STALE_FIELDS = {"format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash",
                 "modelspec.hash_sha256", "ss_network_dim", "ss_network_alpha", "ss_network_args"}


def formats() -> tuple[str, ...]:
    """Every output format some architecture writes."""
    return tuple(sorted({f for a in archs.registry().values() for f in a.formats}))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def resolve_format(arch: Architecture, format: str | None) -> str:
    if format is None:
        return arch.default_format
    if format not in arch.formats:
        raise UsageError(f"{arch.label} LoRAs are written as {' or '.join(arch.formats)}, not {format!r}")
    return format


def save_lora(lora: LoRA, path, format: str | None = None, dtype=None, metadata: dict[str, str] | None = None,
              warn: Callable[..., str | None] | None = None) -> str:
    """Write ``lora`` to ``path`` atomically; returns the format written (default: the
    architecture's, the one every client loads). ``metadata`` adds or overrides header fields.
    ``warn(lora, arch, format, dtype, tensors, header, path)`` returns a line for a
    :class:`ClientWarning` or None (``loramerge.save`` passes :func:`loramerge.clients.write_warning`)."""
    arch = archs.spec(lora.arch)
    format = resolve_format(arch, format)
    dtype = resolve_dtype(dtype) or lora.dtype
    for module in lora:
        if module.needs_base:
            raise module.base_error()
    dropped = _uncarried(lora, arch, format)
    if dropped:
        warnings.warn(f"{format} format cannot carry norm-weight deltas: {len(dropped)} dropped ({dropped[0].key}"
                      f"{' …' if len(dropped) > 1 else ''}); write a kohya- or ComfyUI-style format to keep them",
                      stacklevel=2)
    tensors, header = encode(lora, arch, format, dtype, metadata)
    if warn:
        try:
            message = warn(lora, arch, format, dtype, tensors, header, path)
        except Exception as exc:  # a diagnostic must not stop the write; say that it failed
            message = f"{path}: could not check how clients load it ({type(exc).__name__}: {exc})"
        if message:
            warnings.warn(message, ClientWarning, stacklevel=3)
    save_file(path, tensors, header)
    _warn_notes(lora, arch, format, path)
    return format


def encode(lora: LoRA, arch: Architecture, format: str, dtype: torch.dtype,
           metadata: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of ``lora`` written in ``format`` (without the modules it cannot carry)."""
    lora = complete_groups(_without(lora, _uncarried(lora, arch, format)), arch, format)
    groups = group_modules(lora, arch, format)
    alpha = file_alpha(groups) if _style(arch, format) == "kohya" else None
    tensors: dict[str, torch.Tensor] = {}
    for group in groups:
        group.put(tensors, dtype, alpha)
    _check_written(tensors, lora)
    return tensors, build_header(lora, arch, format, alpha, metadata)


def _warn_notes(lora: LoRA, arch: Architecture, format: str, path) -> None:
    """The client facts of the architecture entry that concern what was just written."""
    for note in arch.notes:
        if note.format == format and any(re.search(note.pattern, m.key) for m in lora):
            warnings.warn(f"{path}: {note.message}", stacklevel=3)


def _style(arch: Architecture, format: str) -> str:
    return next(iter(arch.formats[format].values())).style


def carries_diff(naming: Naming | None) -> bool:
    """Whether files in this naming hold LyCORIS ``.diff``/``.diff_b`` keys: kohya-style files and
    ComfyUI-style ones (whose bias deltas are ``diff_b``) do; diffusers/PEFT files do not."""
    return naming is not None and (naming.style == "kohya" or naming.bias_key == "diff_b")


def _uncarried(lora: LoRA, arch: Architecture, format: str) -> list[LoraModule]:
    """The modules ``format`` cannot hold: norm-weight (1-D) deltas are LyCORIS ``.diff`` keys,
    which kohya- and ComfyUI-style files carry and diffusers/PEFT files cannot."""
    return [m for m in lora if m.is_vector and not carries_diff(arch.naming(format, m.component))]


def _without(lora: LoRA, dropped: list[LoraModule]) -> LoRA:
    if not dropped:
        return lora
    keys = {m.key for m in dropped}
    kept = LoRA([m for m in lora if m.key not in keys], lora.arch, lora.format, lora.metadata, lora.path)
    kept.variant, kept.stats = lora.variant, lora.stats
    return kept


# --------------------------------------------------------------------------------------------
# what the clients will do with it


def complete_groups(lora: LoRA, arch: Architecture, format: str) -> LoRA:
    """Add zero modules so every group a client applies all-or-nothing (its facts' ``together``)
    is complete in kohya-named files (A1111 ignores an OpenCLIP layer's attention otherwise)."""
    from .schemes.clientnames import layer_groups

    extra: list[LoraModule] = []
    alphas = collections.Counter(m.alpha for m in lora)
    for facts in arch.clients.values():
        for component, templates in facts.together.items():
            naming = arch.naming(format, component)
            if naming is None or naming.style != "kohya":
                continue
            mine = [(m.name, m) for m in lora if m.component == component]
            for layer, present in layer_groups(templates, mine).items():
                sibling = next(iter(present.values()))
                for position, t in enumerate(templates):
                    name = t.replace("{i}", layer)
                    if position in present or f"{component}.{name}" in lora:
                        continue
                    extra.append(LoraModule.from_factors(
                        component, name, torch.zeros(sibling.out_features, 1), torch.zeros(1, sibling.in_features),
                        sibling.shape, alphas.most_common(1)[0][0], dtype=sibling.dtype, source=sibling.source))
    if not extra:
        return lora
    padded = LoRA([*lora, *extra], lora.arch, lora.format, lora.metadata, lora.path)
    padded.variant, padded.stats = lora.variant, lora.stats
    return padded


# --------------------------------------------------------------------------------------------
# grouping canonical modules into the modules a format writes (fused projections re-fused)


@dataclass
class Group:
    """One written module: a naming's target and the canonical modules it holds."""

    key: str  # the module's key prefix in the file
    naming: Naming
    target: Target
    members: dict[int, LoraModule]  # position in the target → module

    @property
    def alphas(self) -> list[float]:
        """The alphas a one-alpha file would fold exactly (plain modules: their own)."""
        return [m.alpha for m in self.members.values()] if self.simple and not self.vector else []

    @property
    def simple(self) -> bool:
        return not self.target.fused

    @property
    def vector(self) -> bool:
        return self.simple and self.members[0].is_vector

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up, down, scale) in float32 with scale·up@down the written module's ΔW."""
        if self.simple:
            module = self.members[0]
            up, down = module.factors()
            return _swap(self.target, up, down.shape[1]), down, module.scale
        return fuse_members(self.target, self.members)

    def put(self, tensors: dict, dtype: torch.dtype, alpha: float | None) -> None:
        bias = self._bias()
        if self.vector:  # LyCORIS 'full' on a 1-D parameter: the delta itself
            tensors[f"{self.key}.diff"] = self.members[0].delta().reshape(-1).to(dtype).contiguous()
            if bias is not None:
                tensors[f"{self.key}.diff_b"] = bias.to(dtype).contiguous()
            return
        up, down, scale = self.factors()
        rank = up.shape[1]
        # fold: alpha/rank·up'·down = scale·up·down  (alpha None: PEFT style, alpha = rank)
        factor = scale * rank / alpha if alpha is not None else scale
        if factor != 1.0:
            up = up * factor
        shape = self._shape()
        if len(shape) > 2:  # conv factors as the layer stores them
            up = up.reshape(*up.shape, *([1] * (len(shape) - 2)))
            down = down.reshape(rank, *shape[1:])
        if self.naming.style == "kohya":
            tensors[f"{self.key}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{self.key}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{self.key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        else:
            tensors[f"{self.key}.lora_A.weight"] = down.to(dtype).contiguous()
            tensors[f"{self.key}.lora_B.weight"] = up.to(dtype).contiguous()
        if bias is not None:  # PEFT scales lora_B's bias like its weight; the scale is 1 here
            suffix = self.naming.bias_key or ("diff_b" if self.naming.style == "kohya" else "lora_B.bias")
            tensors[f"{self.key}.{suffix}"] = bias.to(dtype).contiguous()

    def _shape(self) -> tuple[int, ...]:
        if self.simple:
            return self.members[0].shape
        return (sum_rows(self.target, self.members), self.members[next(iter(self.members))].shape[1])

    def _bias(self) -> torch.Tensor | None:
        biases = {p: m.bias_delta() for p, m in self.members.items() if m.bias is not None}
        if not biases:
            return None
        if self.simple:
            return _swap(self.target, biases[0], self.members[0].in_features)
        rows = sum_rows(self.target, self.members)  # fused: each member's rows, zeros for the rest
        fused = torch.zeros(rows)
        for position, (start, end) in enumerate(self.target.rows(rows)):
            if position in biases:
                fused[start:end] = biases[position]
        return _swap(self.target, fused, self.members[next(iter(self.members))].in_features)


def group_modules(lora: LoRA, arch: Architecture, format: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for module in lora:
        naming = arch.naming(format, module.component)
        if naming is None:
            raise LoraMergeError(f"{format} format has no names for {arch.label} component {module.component!r} "
                                 f"(module {module.key})")
        encoded = naming.scheme.encode(module.name)
        if encoded is None:
            raise LoraMergeError(f"module {module.key} has no {naming.scheme.name} name for {format} format")
        target, position = encoded
        key = naming.prefix + (flatten(target.name) if naming.flat else target.name)
        group = groups.setdefault(key, Group(key, naming, target, {}))
        group.members[position] = module
    return [groups[k] for k in sorted(groups)]


def file_alpha(groups: list[Group]) -> float:
    """The one alpha of a kohya file: the alpha that lets the most modules' folds be exact.

    A module of alpha a written with the file's alpha A gets its up factor multiplied by a/A;
    when that is a power of two the multiplication is exact in every float format (as long as
    the values stay in its normal range: an overflow is caught by the finiteness check), so an
    fp16/bf16 input converted to fp16/bf16 keeps its bits up to the exponent
    (tests/test_clients_rules.py checks it bit for bit). Ties go to the most common alpha (most
    folds are then × 1, nothing changes).
    """
    alphas = collections.Counter(a for g in groups for a in g.alphas if a > 0)
    if not alphas:
        return 1.0

    def exact(candidate: float) -> int:
        return sum(n for a, n in alphas.items() if math.frexp(a / candidate)[0] == 0.5)

    return max(alphas, key=lambda a: (exact(a), alphas[a], -a))


def _swap(target: Target, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """Canonical (scale, shift) rows → the scheme's (shift, scale), where the target swaps."""
    if not target.swaps(rows.shape[0], cols):
        return rows
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sum_rows(target: Target, members: dict[int, LoraModule]) -> int:
    position, module = next(iter(members.items()))
    unit = module.out_features // target.ratios[position]
    return unit * sum(target.ratios)


def fuse_members(target: Target, members: dict[int, LoraModule]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One fused module's (up, down, scale) from its canonical members, exactly.

    Members sharing one down factor and one scale (what a split kohya file gives back) stack
    their up factors at the original rank; otherwise the up factor is block-diagonal over the
    members' ranks (rows of absent members are zero), every member's scale folded in.
    """
    factors = {p: m.factors() for p, m in members.items()}
    some = next(iter(members.values()))
    if (len(members) == len(target.members) and len({(m.rank, m.alpha) for m in members.values()}) == 1
            and all(torch.equal(factors[p][1], factors[0][1]) for p in factors)):
        up = torch.cat([factors[p][0] for p in range(len(target.members))], dim=0)
        return up, factors[0][1], some.scale
    total_rows = sum_rows(target, members)
    spans = target.rows(total_rows)
    total_rank = sum(m.rank for m in members.values())
    up = torch.zeros(total_rows, total_rank)
    downs, col = [], 0
    for position, (start, end) in enumerate(spans):
        if position in members:
            m_up, m_down = factors[position]
            up[start:end, col:col + m_up.shape[1]] = m_up * members[position].scale
            downs.append(m_down)
            col += m_up.shape[1]
    return up, torch.cat(downs, dim=0), 1.0


def _check_written(tensors: dict[str, torch.Tensor], lora: LoRA) -> None:
    """What is written must be finite after the cast (fp16 overflows above 65504)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            dtype = str(tensor.dtype).replace("torch.", "")
            raise NonFiniteError(
                f"tensor {key} is not finite after the cast to {dtype} (values beyond its range); "
                "write --dtype bf16 or fp32", lora.path)


# --------------------------------------------------------------------------------------------
# diffusers' lora_adapter_metadata and the header


def _peft_target(name: str) -> str:
    """A module name as a PEFT target/pattern. PEFT matches a target as a dotted suffix, so
    'encoder.layers.0.…' finds CLIP layers whether transformers nests them under
    ``text_model`` (< 5) or not (≥ 5); the full 'text_model.…' would miss the latter."""
    return name.removeprefix("text_model.")


def _peft_pattern(name: str, denoiser: bool) -> str:
    """A rank/alpha pattern key. PEFT takes the first key that is a dotted-suffix regex of a
    module's path, so a denoiser's 'proj_out' would also give its rank to every
    'single_transformer_blocks.N.proj_out'; '^' anchors it to the module itself (as diffusers
    anchors its own rank patterns). Text-encoder names stay suffixes (see :func:`_peft_target`)."""
    return "^" + name if denoiser else _peft_target(name)


def adapter_metadata(lora: LoRA) -> dict:
    """diffusers' ``lora_adapter_metadata``: a LoraConfig per component, keys prefixed. The
    factors hold every scale, so each module's alpha equals its rank."""
    flat = {}
    denoiser = archs.spec(lora.arch).denoiser
    for component in lora.components:
        mods = [m for m in lora if m.component == component]
        r = collections.Counter(m.rank for m in mods).most_common(1)[0][0]
        odd = {_peft_pattern(m.name, component == denoiser): m.rank for m in mods if m.rank != r}
        config = {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": odd,
            "alpha_pattern": dict(odd),
            "target_modules": sorted(_peft_target(m.name) for m in mods),
            "use_dora": False,
            "use_rslora": False,
            "lora_bias": any(m.bias is not None for m in mods),
        }
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    return flat


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def build_header(lora: LoRA, arch: Architecture, format: str, alpha: float | None,
                 extra: dict[str, str] | None) -> dict[str, str]:
    header = {k: v for k, v in lora.metadata.items() if k not in _STALE_FIELDS}
    ranks = {m.rank for m in lora if not m.is_vector} or {1}
    ident = arch.identity
    header.update(ident.header)
    header.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": _number(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_base_model_version": ident.ss_base_model_version,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": (ident.variant_names.get(lora.variant or "") or (ident.modelspec_architecture,))[0],
        "modelspec.implementation": "diffusers" if format == "diffusers" else ident.implementation,
        "modelspec.resolution": header.get("modelspec.resolution", ident.resolution),
        "loramerge.version": __version__,
    })
    if alpha is not None:
        header["ss_network_alpha"] = _number(alpha)
    if lora.variant:  # the full-size variant, when the inputs determined it
        header["loramerge.variant"] = lora.variant
    header.setdefault("modelspec.title", lora.path.stem if lora.path else "loramerge")
    if format == "diffusers":
        header["format"] = "pt"
        # nested pattern dicts keep their order (PEFT uses the first key that matches)
        header["lora_adapter_metadata"] = json.dumps(dict(sorted(adapter_metadata(lora).items())), indent=2)
    for key, value in (extra or {}).items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = str(value)
    return header
