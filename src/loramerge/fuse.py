"""Fusing LoRAs into a base checkpoint, streamed tensor by tensor.

Peak memory stays near the largest tensor plus the LoRAs: each base tensor is read with a
plain file read, its deltas (float32) are added, it is cast once to the output dtype and
written; tensors no LoRA touches are copied bit for bit (or only cast, with ``dtype``). The
output is written to a temporary file or folder and renamed into place on success.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import LoraMergeError, ShapeMismatchError
from .formats.checkpoint import Checkpoint, Placement, to_module_layout
from .formats.safetensors_io import StreamingWriter, TensorSpec
from .formats.write import resolve_dtype
from .lora import LoRA, LoraModule
from .io import load_all
from .merge import merge
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


def placed_delta(module: LoraModule, placement: Placement) -> torch.Tensor:
    """The module's ΔW (float32) laid out as the checkpoint stores that weight."""
    return to_module_layout(module.delta(torch.float32), placement)


def plan_fusion(ckpt: Checkpoint, merged: LoRA) -> dict[tuple[str, str], list[tuple[LoraModule, Placement]]]:
    """(file, tensor) → the modules that change it; refuses missing components and bad shapes."""
    plan: dict[tuple[str, str], list] = collections.defaultdict(list)
    available = ckpt.components
    for module in merged:
        placement = ckpt.placement(module.component, module.name)
        if placement is None:
            if module.component not in available:
                raise LoraMergeError(
                    f"the base has no {module.component} (needed by module {module.key}); "
                    f"it holds {', '.join(sorted(available)) or 'nothing usable'}", ckpt.path)
            raise LoraMergeError(f"the base has no weight for module {module.key}", ckpt.path)
        shape = ckpt.module_shape(placement)
        if math.prod(shape) != math.prod(module.shape) or shape[0] != module.shape[0]:
            raise ShapeMismatchError(
                f"module {module.key} is {tuple(module.shape)} in the LoRA but {tuple(shape)} in the base", ckpt.path)
        plan[(placement.file, placement.key)].append((module, placement))
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
    merged = merge(inputs, weights, method=method, device="cpu", **merge_kwargs)
    plan = plan_fusion(ckpt, merged)
    out_dtype = resolve_dtype(dtype)
    provenance = {"loramerge.fused": merged.metadata.get("loramerge.recipe", "")}
    provenance.update(metadata or {})
    report = FuseReport(output, modules=len(merged), components=merged.components)
    if ckpt.kind == "single":
        _stream_file(ckpt, "", output, plan, out_dtype, provenance, report, progress)
    else:
        _stream_folder(ckpt, output, plan, out_dtype, provenance, report, progress)
    report.seconds = time.perf_counter() - start
    return report


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
                weight = tensor.to(torch.float32)
                for module, placement in changes:
                    delta = placed_delta(module, placement)
                    if placement.rows:
                        r0, r1 = placement.rows
                        weight[r0:r1] += delta.reshape(weight[r0:r1].shape)
                    else:
                        weight += delta.reshape(weight.shape)
                tensor = weight.to(spec.dtype)  # the one cast
                report.tensors_touched += 1
            else:
                tensor = _cast(tensor, out_dtype)
            writer.write(spec.name, tensor)
            report.tensors_total += 1
            if progress:
                progress(report.tensors_total, -1, spec.name)


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
