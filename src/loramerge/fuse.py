"""Fusing LoRAs into a base checkpoint, streamed tensor by tensor.

Peak memory stays near the largest tensor plus the LoRAs: each base tensor is read with a
plain file read, its deltas (float32) are added, it is cast once to the output dtype and
written; tensors no LoRA touches are copied bit for bit (or only cast, with ``dtype``). The
output is written to a temporary file or folder and renamed into place on success.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .basemodel import place
from .blocks import parse_block_weights
from .errors import LoraMergeError, NonFiniteError, ShapeMismatchError
from .formats.checkpoint import Checkpoint, Placement, to_module_layout
from .formats.safetensors_io import StreamingWriter, TensorSpec
from .formats.write import resolve_dtype
from .lora import LoRA, LoraModule, all_finite
from .io import load_all
from .merge import _per_input, merge
from .outputs import Staged, check_output

Progress = Callable[[int, int, str], None]


@dataclass
class FuseReport:
    output: Path
    modules: int = 0
    tensors_touched: int = 0
    tensors_total: int = 0
    seconds: float = 0.0
    components: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Change:
    """One module's contribution to one checkpoint tensor: its weight, or its layer's bias."""

    module: LoraModule
    placement: Placement
    part: str = "weight"  # or "bias"
    coefficient: float = 1.0  # merged modules carry their weights; streamed ones get it here


def placed_delta(change: Change, base: torch.Tensor) -> torch.Tensor:
    """The change (float32) laid out as the checkpoint stores it; ``base`` is the original tensor
    (float32, the placement's rows), which base-dependent modules are computed from."""
    module, placement = change.module, change.placement
    if change.part == "bias":
        delta = module.bias_delta(torch.float32)
        if delta.numel() != base.numel():
            raise ShapeMismatchError(f"module {module.key} has a bias delta of {delta.numel()} values for the "
                                     f"{base.numel()} of {placement.key}", module.source)
    elif module.needs_base:
        delta = module.delta_given(to_module_layout(base, placement))
    else:
        delta = module.delta(torch.float32)
    return change.coefficient * to_module_layout(delta, placement)


def plan_fusion(ckpt: Checkpoint, merged: LoRA, streamed: Sequence[tuple[LoraModule, float]] = ()
                ) -> dict[tuple[str, str], list[Change]]:
    """(file, tensor) → the changes to it: every module's weight and bias delta, and the
    ``streamed`` (module, weight) pairs applied from the base itself. Refuses missing
    components, bad shapes and bias deltas on layers without a bias."""
    plan: dict[tuple[str, str], list[Change]] = collections.defaultdict(list)
    for module, coefficient in [(m, 1.0) for m in merged] + list(streamed):
        placement = place(ckpt, module)
        plan[(placement.file, placement.key)].append(Change(module, placement, "weight", coefficient))
        if module.bias is not None:
            bias = ckpt.bias_placement(placement)
            if bias is None:
                raise LoraMergeError(f"module {module.key} changes a bias, but the base has no bias beside "
                                     f"{placement.key}", ckpt.path)
            plan[(bias.file, bias.key)].append(Change(module, bias, "bias", coefficient))
    return plan


def fuse(
    base: str | os.PathLike,
    loras: Sequence[LoRA | str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | str | None = None,
    method: str = "cat",
    progress: Progress | None = None,
    metadata: dict[str, str] | None = None,
    arch: str | None = None,
    **merge_kwargs,
) -> FuseReport:
    """Write ``base`` + Σ wᵢ·ΔWᵢ (or another merge of the LoRAs) to ``output``."""
    start = time.perf_counter()
    ckpt = Checkpoint(base)
    output = check_output(output, [ckpt.path] + [Path(x) for x in loras if not isinstance(x, LoRA)],
                          folder=ckpt.kind == "diffusers", not_inside=[ckpt.path])
    inputs = load_all(loras, arch=arch, prefer=ckpt.arch)
    for lora in inputs:
        ckpt.check_arch(lora.arch, lora.path)
    inputs, streamed = _base_dependent(inputs, weights, method, merge_kwargs.get("block_weights"))
    merged = merge(inputs, weights, method=method, device="cpu", base=ckpt, **merge_kwargs)
    plan = plan_fusion(ckpt, merged, streamed)
    out_dtype = resolve_dtype(dtype)
    provenance = {"loramerge.fused": merged.metadata.get("loramerge.recipe", "")}
    provenance.update(metadata or {})
    components = sorted(set(merged.components) | {m.component for m, _ in streamed},
                        key=lambda c: (c.startswith("text_encoder"), c))
    report = FuseReport(output, modules=len(merged) + len(streamed), components=components)
    if ckpt.kind == "single":
        _stream_file(ckpt, "", output, plan, out_dtype, provenance, report, progress)
    else:
        _stream_folder(ckpt, output, plan, out_dtype, provenance, report, progress)
    report.seconds = time.perf_counter() - start
    return report


# methods whose result is the exact weighted sum: base-dependent modules can be streamed beside them
_SUMS = ("cat", "linear")


def _base_dependent(inputs: list[LoRA], weights, method: str, block_weights):
    """Under a summing method, the modules that depend on the base weight are taken out of the
    merge and applied from each base tensor as it streams by (w·(W' − W), w the source's weight
    times its block weight); under any other method ``merge`` resolves them against the base."""
    if method not in _SUMS or not any(m.needs_base for lora in inputs for m in lora):
        return inputs, []
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    specs = _per_input(block_weights, len(inputs))
    kept, streamed = [], []
    for lora, w, spec in zip(inputs, weights, specs):
        blocks = parse_block_weights(spec, lora.arch) if spec is not None else None
        streamed += [(m, w * (blocks.weight_for(m) if blocks else 1.0)) for m in lora if m.needs_base]
        rest = LoRA([m for m in lora if not m.needs_base], lora.arch, lora.format, lora.metadata, lora.path)
        rest.variant = lora.variant
        kept.append(rest)
    return kept, streamed


def _cast(tensor: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    if out_dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(out_dtype)


def _stream_file(ckpt, rel, target: Path, plan, out_dtype, metadata, report, progress) -> None:
    source = ckpt.files[rel]
    specs = [TensorSpec(name, out_dtype if (out_dtype and info.dtype.is_floating_point) else info.dtype, info.shape)
             for name, info in source.infos.items()]
    header = dict(source.metadata)
    header.update(metadata)
    with StreamingWriter(target, specs, header) as writer:
        for i, spec in enumerate(writer.order):
            tensor = source.read(spec.name)
            changes = plan.get((rel, spec.name))
            if changes:
                tensor = _changed(ckpt, spec, tensor, changes)
                report.tensors_touched += 1
            else:
                cast = _cast(tensor, out_dtype)
                if cast is not tensor and not all_finite(cast) and all_finite(tensor):
                    raise _overflow(ckpt, spec)
                tensor = cast
            writer.write(spec.name, tensor)
            report.tensors_total += 1
            if progress:
                progress(report.tensors_total, -1, spec.name)


def _changed(ckpt, spec, tensor: torch.Tensor, changes: list[Change]) -> torch.Tensor:
    """base + Σ changes in float32, cast once to the output dtype; refuses integer and non-finite
    base tensors and a result the output dtype cannot hold."""
    if not tensor.is_floating_point():
        raise LoraMergeError(f"base tensor {spec.name} is {str(tensor.dtype).replace('torch.', '')}, not floating "
                             f"point; a LoRA ({changes[0].module.key}) cannot be added to it", ckpt.path)
    base = tensor.to(torch.float32)
    if not all_finite(base):
        raise NonFiniteError(f"base tensor {spec.name} holds NaN or Inf values; a LoRA ({changes[0].module.key}) "
                             "cannot be fused into it", ckpt.path)
    weight = base.clone()
    for change in changes:
        rows = change.placement.rows
        part = weight[rows[0]:rows[1]] if rows else weight
        original = base[rows[0]:rows[1]] if rows else base
        part += placed_delta(change, original).reshape(part.shape)
    tensor = weight.to(spec.dtype)  # the one cast
    if not all_finite(tensor):
        raise _overflow(ckpt, spec)
    return tensor


def _overflow(ckpt, spec) -> NonFiniteError:
    name = str(spec.dtype).replace("torch.", "")
    return NonFiniteError(f"tensor {spec.name} is not finite after the cast to {name} (values beyond its range); "
                          "fuse with --dtype bf16 or fp32", ckpt.path)


def _stream_folder(ckpt: Checkpoint, output: Path, plan, out_dtype, metadata, report, progress) -> None:
    with Staged([output], folder=True) as (staging,):
        shutil.copytree(ckpt.path, staging, ignore=_skip_streamed(ckpt), symlinks=True)
        for rel in ckpt.files:
            _stream_file(ckpt, rel, staging / rel, plan, out_dtype, {}, report, progress)
        _fix_indexes(staging, out_dtype is not None)
        (staging / "loramerge_fused.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))


def _skip_streamed(ckpt: Checkpoint):
    streamed = {(ckpt.path / rel).resolve() for rel in ckpt.files}

    def ignore(directory, names):
        return [n for n in names if (Path(directory) / n).resolve() in streamed]

    return ignore


def _fix_indexes(folder: Path, dtype_changed: bool) -> None:
    """Sharded weights: the index's total_size follows the new dtype."""
    if not dtype_changed:
        return
    from .formats.safetensors_io import read_header

    for index in folder.glob("*/*.safetensors.index.json"):
        data = json.loads(index.read_text())
        total = 0
        for shard in set(data.get("weight_map", {}).values()):
            infos, _ = read_header(index.parent / shard)
            total += sum(i.end - i.begin for i in infos.values())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
