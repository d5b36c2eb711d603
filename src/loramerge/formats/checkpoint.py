"""Base model checkpoints: where each LoRA module's weight lives.

Two layouts, both described by the architecture entries:
- single files: every component's weights under a key prefix in a naming scheme
  (:attr:`Component.single_file`: SD's ``model.diffusion_model.`` sgm names, OpenCLIP's fused
  ``in_proj_weight``, Flux's BFL names with fused ``qkv``/``linear1``, ComfyUI's
  ``diffusion_model.`` files of the DiTs…); the architecture is the one whose namings place
  the most tensors;
- diffusers folders: one subfolder per component (``unet/``, ``transformer/``,
  ``text_encoder*/``) with ``*.safetensors`` weights (sharded or not), named canonically.
A :class:`Placement` names the file, the tensor, and the rows of that tensor a module owns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ArchitectureMismatchError, FileFormatError
from . import archs
from .archs import Architecture
from .placement import name_index
from .safetensors_io import SafetensorsFile
from .schemes import Target


@dataclass(frozen=True)
class Placement:
    file: str  # relative path of the safetensors file ('' for a single-file checkpoint)
    key: str
    rows: tuple[int, int] | None = None  # the rows of a fused tensor this module owns
    transpose: bool = False  # stored transposed (OpenCLIP's text_projection)
    swap_halves: bool = False  # stored as (shift, scale) where the module emits (scale, shift)


class Checkpoint:
    """A base model on disk, opened lazily (headers only until a tensor is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.kind = "diffusers"
            self.files = self._open_folder()
            self.spec = self._folder_arch()
        else:
            if self.path.suffix.lower() != ".safetensors" and self.path.exists():
                raise FileFormatError("base checkpoints are read from .safetensors files or diffusers folders", self.path)
            self.kind = "single"
            self.files = {"": SafetensorsFile(self.path)}
            self.spec = self._single_file_arch()
        self.arch = self.spec.name

    # ---------------------------------------------------------------- opening and detection

    def _open_folder(self) -> dict[str, SafetensorsFile]:
        known = {c.name for a in archs.registry().values() for c in a.components}
        files = {}
        for component in sorted(known):
            folder = self.path / component
            if folder.is_dir():
                for f in sorted(folder.glob("*.safetensors")):
                    files[f"{component}/{f.name}"] = SafetensorsFile(f)
        if not files:
            raise FileFormatError(f"folder holds no safetensors weights in any of {', '.join(sorted(known))}/",
                                  self.path)
        return files

    def _json(self, relative: str) -> dict:
        file = self.path / relative
        if not file.is_file():
            return {}
        try:
            data = json.loads(file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FileFormatError(f"{relative} is not valid JSON", self.path) from None
        except OSError as exc:
            raise FileFormatError(f"cannot read {relative}: {exc.strerror or exc}", self.path) from None
        if not isinstance(data, dict):
            raise FileFormatError(f"{relative} is not a JSON object", self.path)
        if not isinstance(data.get("_class_name", ""), str):
            raise FileFormatError(f"{relative}: _class_name is not a string", self.path)
        return data

    def _folder_arch(self) -> Architecture:
        pipeline = self._json("model_index.json").get("_class_name")
        denoisers = {a.denoiser for a in archs.registry().values()}
        configs = {d: self._json(f"{d}/config.json") for d in denoisers}
        found = archs.identify(pipeline, configs)
        if found is None:
            classes = sorted({c.get("_class_name") for c in configs.values()} - {None})
            raise FileFormatError(f"cannot tell the architecture of this folder (pipeline {pipeline!r}, "
                                  f"denoiser classes {classes})", self.path)
        return found

    def _single_file_arch(self) -> Architecture:
        """The architecture whose names the most tensors have; on a tie, the one whose model the
        file covers most (LTX-Video's blocks are a part of LTX-2's names: no audio, LTX-Video)."""
        keys = self.files[""].keys()
        scores = {a.name: self._single_file_hits(a, keys) for a in archs.registry().values()}
        best = max(scores, key=lambda n: scores[n])
        if scores[best][0] == 0:
            raise FileFormatError("not a base model checkpoint of any known architecture (no tensor names match)",
                                  self.path)
        return archs.spec(best)

    @staticmethod
    def _single_file_hits(arch: Architecture, keys: list[str]) -> tuple[int, float]:
        hits, coverage = 0, 0.0
        for component in arch.components:
            for naming in component.single_file:
                index = name_index(arch, component.name, naming)
                known = {naming.prefix + _checkpoint_key(naming.scheme.decode(n)) for n in index.exact}
                found = sum(k in known for k in keys)
                hits, coverage = hits + found, max(coverage, found / max(len(known), 1))
        return hits, coverage

    def check_arch(self, lora_arch: str, lora_path=None) -> None:
        if lora_arch != self.arch:
            raise ArchitectureMismatchError(f"is a {lora_arch} LoRA but the base {self.path} is {self.arch}", lora_path)

    @property
    def components(self) -> set[str]:
        if self.kind == "diffusers":
            return {f.split("/", 1)[0] for f in self.files}
        keys = self.files[""].keys()
        return {c.name for c in self.spec.components
                if any(k.startswith(n.prefix) and self._decodes(n, k) for n in c.single_file for k in keys)}

    @staticmethod
    def _decodes(naming, key: str) -> bool:
        return _decode_key(naming, key) is not None

    # ---------------------------------------------------------------- module → tensor

    def placement(self, component: str, name: str) -> Placement | None:
        """Where the weight of a canonical module lives, or None if the checkpoint lacks it."""
        if self.kind == "diffusers":
            return self._folder_placement(component, name)
        spec_component = self.spec.component(component)
        for naming in spec_component.single_file if spec_component else ():
            encoded = naming.scheme.encode(name)
            if encoded is None:
                continue
            target, position = encoded
            key = naming.prefix + target.checkpoint_key
            if key in self.files[""]:
                return self._placed(key, target, position)
        return None

    def _placed(self, key: str, target: Target, position: int) -> Placement:
        shape = self.files[""].infos[key].shape
        if target.transpose:
            shape = tuple(reversed(shape))
        rows = target.rows(shape[0])[position] if target.fused else None
        cols = math.prod(shape[1:])
        return Placement("", key, rows, target.transpose, target.swaps(shape[0], cols))

    def _folder_placement(self, component: str, name: str) -> Placement | None:
        for candidate in (name, name.removeprefix("text_model.")):
            for rel, f in self.files.items():
                if rel.startswith(component + "/") and candidate + ".weight" in f:
                    return Placement(rel, candidate + ".weight")
        return None

    def bias_placement(self, placement: Placement) -> Placement | None:
        """Where the bias of the layer whose weight is at ``placement`` lives (None: no bias)."""
        stem, sep, _ = placement.key.rpartition("weight")
        key = stem + "bias" if sep else None
        if key is None or placement.transpose or key not in self.files[placement.file]:
            return None
        return Placement(placement.file, key, placement.rows, False, placement.swap_halves)

    def module_weight(self, placement: Placement):
        """A module's weight (float32) in the module's own layout: its rows of a fused tensor,
        transposed or half-swapped back where the checkpoint stores it so."""
        import torch

        tensor = self.files[placement.file].read(placement.key).to(torch.float32)
        if placement.rows:
            tensor = tensor[placement.rows[0]:placement.rows[1]]
        return to_module_layout(tensor, placement)

    def module_shape(self, placement: Placement) -> tuple[int, ...]:
        shape = self.files[placement.file].infos[placement.key].shape
        if placement.transpose:
            shape = tuple(reversed(shape))
        if placement.rows:
            shape = (placement.rows[1] - placement.rows[0], *shape[1:])
        return tuple(shape)

    # ---------------------------------------------------------------- tensor → modules (extract)

    def modules(self) -> Iterator[tuple[str, str, Placement]]:
        """Every Linear/Conv weight of the checkpoint the architecture's tables know, as
        (component, canonical name, placement)."""
        for rel, f in self.files.items():
            for key, info in f.infos.items():
                if len(info.shape) < 2:
                    continue
                yield from self._modules_of(rel, key)

    def _modules_of(self, rel: str, key: str):
        if self.kind == "diffusers":
            component = rel.split("/", 1)[0]
            spec_component = self.spec.component(component)
            if spec_component is None or not key.endswith(".weight"):
                return
            name = key[: -len(".weight")]
            for naming in spec_component.read:
                if naming.prefix == "" and not naming.flat:
                    for candidate in [name, *naming.scheme.aliases(name)]:
                        if name_index(self.spec, component, naming).dotted(candidate) is not None:
                            yield component, candidate, Placement(rel, key)
                            return
            return
        for spec_component in self.spec.components:
            for naming in spec_component.single_file:
                target = _decode_key(naming, key)
                if target is None or name_index(self.spec, spec_component.name, naming).dotted(target.name) is None:
                    continue
                for position, member in enumerate(target.members):
                    yield spec_component.name, member, self._placed(key, target, position)
                return


def _checkpoint_key(target: Target | None) -> str:
    return target.checkpoint_key if target is not None else ""


def _decode_key(naming, key: str) -> Target | None:
    """The target a single-file tensor name holds under ``naming`` (None: not one of its weights)."""
    if not key.startswith(naming.prefix):
        return None
    stem = key[len(naming.prefix):]
    for name in (stem.removesuffix(".weight"), stem.removesuffix("_weight"), stem):
        target = naming.scheme.decode(name) if name else None
        if target is not None and target.checkpoint_key == stem:
            return target
    return None


def to_module_layout(tensor, placement: Placement):
    """Between a module's layout and the checkpoint's, both ways: transposing and swapping the
    two halves of the rows are their own inverses."""
    import torch

    if placement.transpose:
        tensor = tensor.reshape(tensor.shape[0], -1).T
    if placement.swap_halves:
        first, second = tensor.chunk(2, dim=0)
        tensor = torch.cat([second, first], dim=0)
    return tensor
