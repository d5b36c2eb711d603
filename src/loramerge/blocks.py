"""Per-block and per-module weights.

Four ways to say how strongly each part of a LoRA counts, all resolved to one multiplier per
module:

- A1111 "LoRA Block Weight" vectors: 17 or 26 values for SD1/SD2, 12 or 20 for SDXL, as a list,
  a comma string, or a preset name (``OUTALL``…). BASE is the text encoders; INxx, M00, OUTxx
  are the sgm blocks ``input_blocks.xx``, ``middle_block``, ``output_blocks.xx``.
- diffusers-style dicts, as in ``set_adapters(..., adapter_weights=)``:
  ``{"unet": {"down": 0.5, "mid": 1, "up": {"block_0": [1, 0.5, 0]}}, "text_encoder": 0.3}``.
  A list entry is per layer of the block (layer j = resnets.j and attentions.j; diffusers
  itself applies these to attention layers only — the same for attention-only LoRAs).
- DiT block ranges by the architecture's block kinds (its entry's grammar):
  ``{"transformer": {"double": {"0-9": 0.5}, "single": 0.8}}`` for Flux (double blocks are
  ``transformer_blocks``, single blocks ``single_transformer_blocks``), ``joint`` for SD3…;
  indices past the model's blocks are refused.
- Glob patterns on canonical module keys, applied last: ``{"unet.up_blocks.1.*": 0}``.
Anything a spec does not mention keeps weight 1.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass, field

from .errors import UsageError
from .formats import archs, keymaps
from .lora import LoraModule

# The extension's default presets (17 values, SD1); applied to SDXL they are refused.
PRESETS = {
    "NONE": [0] * 17,
    "ALL": [1] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
}


@dataclass
class BlockWeights:
    """Resolved weights: by block id, by component, then glob patterns (last one wins)."""

    arch: str
    blocks: dict[str, float] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    patterns: list[tuple[str, float]] = field(default_factory=list)

    def weight_for(self, module: LoraModule) -> float:
        w = 1.0
        if module.component in self.components:
            w = self.components[module.component]
        block = block_id(self.arch, module)
        if block is not None and block in self.blocks:
            w = self.blocks[block]
        for pattern, value in self.patterns:
            if fnmatch.fnmatchcase(module.key, pattern):
                w = value
        return w

    def describe(self) -> dict:
        return {"blocks": dict(self.blocks), "components": dict(self.components), "patterns": list(map(list, self.patterns))}


def block_id(arch: str, module: LoraModule) -> str | None:
    """The block a module belongs to: BASE for text encoders, the denoiser's grammar for the
    rest (INxx/M00/OUTxx for UNets, kind.i for DiTs), None for modules outside any block."""
    spec = archs.spec(arch)
    if module.component in spec.text_encoders:
        return "BASE"
    block = spec.blocks.block_of(module.name)
    if block is not None and module.component != spec.denoiser:  # an expert's own blocks
        return f"{module.component}:{block}"
    return block


@functools.cache
def block_counts(arch: str) -> dict[str, int]:
    """How many blocks of each kind the architecture's largest variant has (DiT grammars)."""
    spec = archs.spec(arch)
    counts: dict[str, int] = {}
    if spec.blocks.kind != "transformer":
        return counts
    for variant in spec.variants:
        for name in keymaps.table(variant).get(spec.denoiser, {}):
            block = spec.blocks.block_of(name)
            if block is not None:
                kind, index = block.split(".")
                counts[kind] = max(counts.get(kind, 0), int(index) + 1)
    return counts


# --------------------------------------------------------------------------------------------


def parse_block_weights(spec, arch: str) -> BlockWeights:
    """Any supported spec (vector, comma string, preset, dict, JSON string) → BlockWeights."""
    if isinstance(spec, BlockWeights):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"block weights: not valid JSON ({exc.msg})") from None
        elif text.upper() in PRESETS:
            spec = PRESETS[text.upper()]
        else:
            try:
                spec = [float(x) for x in text.split(",")]
            except ValueError:
                raise UsageError(
                    f"block weights {spec!r}: expected a preset ({', '.join(PRESETS)}), "
                    "comma-separated numbers, or a JSON object"
                ) from None
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in spec):
            raise UsageError(f"block weights: a vector holds numbers, got {_short(spec)}")
        try:
            return from_vector([float(x) for x in spec], arch)
        except ValueError:
            raise UsageError(f"block weights: a vector holds numbers, got {_short(spec)}") from None
    if isinstance(spec, dict):
        return from_dict(spec, arch)
    raise UsageError(f"block weights: unsupported value {spec!r}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def from_vector(values: list[float], arch: str) -> BlockWeights:
    n = len(values)
    spec = archs.spec(arch)
    vectors = getattr(spec.blocks, "vectors", {})
    if n not in vectors:
        takes = f"{' or '.join(map(str, sorted(vectors)))} values" if vectors else "no block weight vectors (use a dict)"
        raise UsageError(f"a LoRA Block Weight vector for {spec.label} takes {takes}, got {n}")
    weights = BlockWeights(arch)
    for block, value in zip(vectors[n], values):
        if block == "BASE":
            weights.components.update({c: value for c in archs.spec(arch).text_encoders})
        else:
            weights.blocks[block] = value
    return weights


_RESOLVED = {"blocks", "components", "patterns"}


def from_dict(spec: dict, arch: str) -> BlockWeights:
    if spec and set(spec) <= _RESOLVED:  # the resolved form a merged file's recipe records
        return _from_resolved(spec, arch)
    weights = BlockWeights(arch)
    arch_spec = archs.spec(arch)
    if any(k in spec for k in ("down", "mid", "up")):  # a bare UNet dict
        spec = {"unet": spec}
    for key, value in spec.items():
        if any(ch in key for ch in "*?[") or "." in key:
            weights.patterns.append((key, _number(value, key)))
        elif key in arch_spec.text_encoders:
            weights.components[key] = _number(value, key)
        elif key == arch_spec.denoiser and arch_spec.blocks.kind == "unet":
            _unet_dict(weights, value, arch_spec)
        elif key in arch_spec.denoisers:
            _transformer_dict(weights, value, arch, key)
        else:
            raise UsageError(f"block weights: {key!r} is not a component of {arch_spec.label} "
                             f"({', '.join(arch_spec.component_names)}) nor a module pattern")
    return weights


def _from_resolved(spec: dict, arch: str) -> BlockWeights:
    weights = BlockWeights(arch)
    valid = {b for vector in getattr(archs.spec(arch).blocks, "vectors", {}).values() for b in vector}
    valid |= {f"{kind}.{i}" for kind, n in block_counts(arch).items() for i in range(n)}
    for block, value in (spec.get("blocks") or {}).items():
        if block not in valid:
            raise UsageError(f"block weights: {archs.spec(arch).label} has no block {block!r}")
        weights.blocks[block] = _number(value, f"blocks.{block}")
    for component, value in (spec.get("components") or {}).items():
        if component not in archs.spec(arch).component_names:
            raise UsageError(f"block weights: {component!r} is not a component of {archs.spec(arch).label}")
        weights.components[component] = _number(value, f"components.{component}")
    for item in spec.get("patterns") or []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise UsageError(f"block weights: patterns holds [pattern, weight] pairs, got {item!r}")
        weights.patterns.append((item[0], _number(item[1], item[0])))
    return weights


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"block weights: {where} must be a number, got {value!r}")
    return float(value)


def _unet_dict(weights: BlockWeights, spec, arch_spec) -> None:
    if not isinstance(spec, dict):
        weights.components[arch_spec.denoiser] = _number(spec, arch_spec.denoiser)
        return
    n_down = arch_spec.blocks.down_blocks
    for key, value in spec.items():
        if key == "mid":
            weights.blocks["M00"] = _number(value[0] if isinstance(value, list) and len(value) == 1 else value, "mid")
        elif key in ("down", "up"):
            per_block = value if isinstance(value, dict) else {f"block_{i}": value for i in range(n_down)}
            for block, layers in per_block.items():
                if not block.startswith("block_") or not block[6:].isdigit():
                    raise UsageError(f"block weights: unet.{key} keys are block_0, block_1, …; got {block!r}")
                _set_layers(weights, key, int(block[6:]), layers, n_down)
        else:
            raise UsageError(f"block weights: unet keys are down, mid and up; got {key!r}")


def _set_layers(weights: BlockWeights, updown: str, block: int, layers, n_blocks: int) -> None:
    """down.block_i layer j is input_blocks.{3i+j+1}; up.block_i layer j is output_blocks.{3i+j}."""
    n_layers = 2 if updown == "down" else 3
    if isinstance(layers, list):
        if len(layers) == 1:
            layers = layers * n_layers
        if len(layers) != n_layers:
            raise UsageError(f"block weights: {updown}.block_{block} takes {n_layers} values, got {len(layers)}")
    else:
        value = _number(layers, f"{updown}.block_{block}")
        layers = [value] * n_layers
        if updown == "down" and block < n_blocks - 1:  # the block's downsampler
            weights.blocks[f"IN{3 * block + 3:02d}"] = value
    for j, value in enumerate(layers):
        value = _number(value, f"{updown}.block_{block}[{j}]")
        if updown == "down":
            weights.blocks[f"IN{3 * block + j + 1:02d}"] = value
        else:
            weights.blocks[f"OUT{3 * block + j:02d}"] = value


def _transformer_dict(weights: BlockWeights, spec, arch: str, component: str) -> None:
    arch_spec = archs.spec(arch)
    if not isinstance(spec, dict):
        weights.components[component] = _number(spec, component)
        return
    prefix = "" if component == arch_spec.denoiser else f"{component}:"
    grammar, counts = arch_spec.blocks, block_counts(arch)
    for key, value in spec.items():
        kind = grammar.resolve_kind(key)
        if kind is None:
            raise UsageError(f"block weights: {arch_spec.denoiser} block kinds for {arch} are "
                             f"{', '.join(grammar.kinds)}; got {key!r}")
        count = counts.get(kind, 0)
        if isinstance(value, dict):
            items = [(i, v, f"{key}.{span}") for span, v in value.items() for i in _span(span)]
        elif isinstance(value, list):
            items = [(i, v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = [(i, value, key) for i in range(count)]
        for i, v, where in items:
            if i >= count:
                raise UsageError(f"block weights: {where}: {arch_spec.label} has {count} {kind} blocks (0-{count - 1})")
            weights.blocks[f"{prefix}{kind}.{i}"] = _number(v, where)


def _span(text) -> range:
    text = str(text)
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return range(lo, hi + 1)
        return range(int(text), int(text) + 1)
    except ValueError:
        raise UsageError(f"block weights: block range {text!r} is not N or N-M") from None
