"""Base model checkpoints: where each LoRA module's weight lives.

Two layouts:
- single files: SD1/SD2/SDXL in LDM/sgm naming (``model.diffusion_model.…``,
  ``cond_stage_model.…``, ``conditioner.embedders.N.…``; OpenCLIP text encoders with q, k, v
  stacked in ``attn.in_proj_weight``) and Flux in BFL naming (fused ``qkv``/``linear1``);
- diffusers folders: ``unet/``, ``transformer/``, ``text_encoder*/`` with
  ``diffusion_pytorch_model*.safetensors`` or ``model*.safetensors`` (sharded or not).
A :class:`Placement` names the file, the tensor, and the rows of that tensor a module owns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ArchitectureMismatchError, FileFormatError
from . import archs, flux, keymaps
from .names import diffusers_to_sgm, is_sgm_name, sgm_to_diffusers, template
from .safetensors_io import SafetensorsFile

UNET_PREFIX = "model.diffusion_model."
# Single-file text encoders: (naming, key prefix) per architecture and component.
SINGLE_FILE_TEXT = {
    "sd1": {"text_encoder": ("hf", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"text_encoder": ("hf", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
}
_OPENCLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))$")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_PIPELINE_ARCH = {"StableDiffusionPipeline": "sd1", "StableDiffusionXLPipeline": "sdxl",
                  "FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}


@dataclass(frozen=True)
class Placement:
    file: str  # relative path of the safetensors file ('' for a single-file checkpoint)
    key: str
    rows: tuple[int, int] | None = None  # the rows of a fused tensor this module owns
    transpose: bool = False  # OpenCLIP stores text_projection as x @ P, i.e. the Linear weight transposed
    swap_halves: bool = False  # BFL's final modulation emits (shift, scale); diffusers (scale, shift)


class Checkpoint:
    """A base model on disk, opened lazily (headers only until a tensor is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.kind = "diffusers"
            self.files = self._open_folder()
            self.arch = self._folder_arch()
        else:
            if self.path.suffix.lower() != ".safetensors" and self.path.exists():
                raise FileFormatError("base checkpoints are read from .safetensors files or diffusers folders", self.path)
            self.kind = "single"
            self.files = {"": SafetensorsFile(self.path)}
            self.arch = self._single_file_arch()
        self.spec = archs.spec(self.arch)

    # ---------------------------------------------------------------- opening and detection

    def _open_folder(self) -> dict[str, SafetensorsFile]:
        files = {}
        for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            folder = self.path / component
            if folder.is_dir():
                for f in sorted(folder.glob("*.safetensors")):
                    files[f"{component}/{f.name}"] = SafetensorsFile(f)
        if not files:
            raise FileFormatError("folder holds no unet/, transformer/ or text_encoder*/ safetensors weights", self.path)
        return files

    def _folder_arch(self) -> str:
        index = self.path / "model_index.json"
        if index.is_file():
            name = json.loads(index.read_text()).get("_class_name", "")
            if name in _PIPELINE_ARCH:
                arch = _PIPELINE_ARCH[name]
                if arch == "sd1" and self._unet_cross_attention_dim() == 1024:
                    return "sd2"
                return arch
        if any(k.startswith("transformer/") for k in self.files):
            return "flux" if any("single_transformer_blocks" in key for f in self.files.values() for key in f.keys()) else "sd3"
        if any(k.startswith("text_encoder_2/") for k in self.files):
            return "sdxl"
        return "sd2" if self._unet_cross_attention_dim() == 1024 else "sd1"

    def _unet_cross_attention_dim(self) -> int | None:
        config = self.path / "unet" / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("cross_attention_dim")
            return value if isinstance(value, int) else None
        return None

    def _single_file_arch(self) -> str:
        keys = self.files[""].keys()
        has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
        if any(".img_attn.qkv." in k or k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
            self.flux_prefix = UNET_PREFIX if has(UNET_PREFIX + "double_blocks.") else ""
            return "flux"
        if has("conditioner.embedders."):
            return "sdxl"
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
        if has(UNET_PREFIX):
            if has(UNET_PREFIX + "label_emb."):
                return "sdxl"
            key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
            width = self.files[""].infos[key].shape[1] if key else 768
            return {1024: "sd2", 2048: "sdxl"}.get(width, "sd1")
        raise FileFormatError("not a base model checkpoint: no model.diffusion_model.*, Flux blocks or text encoder keys",
                              self.path)

    def check_arch(self, lora_arch: str, lora_path=None) -> None:
        if lora_arch != self.arch:
            raise ArchitectureMismatchError(
                f"is a {lora_arch} LoRA but the base {self.path} is {self.arch}", lora_path)

    @property
    def components(self) -> set[str]:
        if self.kind == "diffusers":
            return {f.split("/", 1)[0] for f in self.files}
        keys = self.files[""].keys()
        found = set()
        if self.arch == "flux":
            found.add("transformer")
        elif any(k.startswith(UNET_PREFIX) for k in keys):
            found.add("unet")
        for component, (_, prefix) in SINGLE_FILE_TEXT.get(self.arch, {}).items():
            if any(k.startswith(prefix) for k in keys):
                found.add(component)
        return found

    # ---------------------------------------------------------------- module → tensor

    def placement(self, component: str, name: str) -> Placement | None:
        """Where the weight of a canonical module lives, or None if the checkpoint lacks it."""
        if self.kind == "diffusers":
            return self._folder_placement(component, name)
        if component == "unet":
            return self._existing(Placement("", UNET_PREFIX + diffusers_to_sgm(name, self.spec.unet_layout) + ".weight"))
        if component == "transformer" and self.arch == "flux":
            return self._flux_placement(name)
        naming = SINGLE_FILE_TEXT.get(self.arch, {}).get(component)
        if naming is None:
            return None
        style, prefix = naming
        if style == "hf":
            return self._existing(Placement("", prefix + name + ".weight"))
        return self._openclip_placement(prefix, name)

    def _existing(self, placement: Placement) -> Placement | None:
        return placement if placement.key in self.files[placement.file] else None

    def _folder_placement(self, component: str, name: str) -> Placement | None:
        for candidate in (name, name.removeprefix("text_model.")):
            for rel, f in self.files.items():
                if rel.startswith(component + "/") and candidate + ".weight" in f:
                    return Placement(rel, candidate + ".weight")
        return None

    def _flux_placement(self, name: str) -> Placement | None:
        try:
            target, position = flux.diffusers_to_bfl(name)
        except KeyError:
            return None
        key = self.flux_prefix + target.bfl_name + ".weight"
        if key not in self.files[""]:
            return None
        rows = self.files[""].infos[key].shape[0]
        ratios = target.ratios
        unit = rows // sum(ratios)
        start = unit * sum(ratios[:position])
        fused = len(target.members) > 1
        return Placement("", key, (start, start + unit * ratios[position]) if fused else None,
                         swap_halves=target.swap_halves)

    def _openclip_placement(self, prefix: str, name: str) -> Placement | None:
        if name == "text_projection":
            return self._existing(Placement("", prefix + "text_projection", transpose=True))
        match = _OPENCLIP_LAYER.match(name)
        if not match:
            return None
        layer, part = match.group(1), match.group(2)
        block = f"{prefix}transformer.resblocks.{layer}."
        if part.startswith("self_attn.") and part != "self_attn.out_proj":
            key = block + "attn.in_proj_weight"
            if key not in self.files[""]:
                return None
            width = self.files[""].infos[key].shape[1]
            j = "qkv".index(part[len("self_attn.")])
            return Placement("", key, (j * width, (j + 1) * width))
        suffix = {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight",
                  "mlp.fc2": "mlp.c_proj.weight"}[part]
        return self._existing(Placement("", block + suffix))

    def module_shape(self, placement: Placement) -> tuple[int, ...]:
        shape = self.files[placement.file].infos[placement.key].shape
        if placement.rows:
            shape = (placement.rows[1] - placement.rows[0], *shape[1:])
        if placement.transpose:
            shape = tuple(reversed(shape))
        return tuple(shape)

    # ---------------------------------------------------------------- tensor → modules (extract)

    def modules(self) -> Iterator[tuple[str, str, Placement]]:
        """Every Linear/Conv weight of the checkpoint as (component, canonical name, placement)."""
        templates = {(c, template(n, False)) for v in self.spec.variants
                     for c, mods in keymaps.table(v).items() for n in mods}
        for rel, f in self.files.items():
            for key, info in f.infos.items():
                if len(info.shape) not in (2, 4) or not key.endswith((".weight", "text_projection", "in_proj_weight")):
                    continue
                for component, name, placement in self._modules_of(rel, key):
                    if (component, template(name, False)) in templates:
                        yield component, name, placement

    def _modules_of(self, rel: str, key: str):
        if self.kind == "diffusers":
            component = rel.split("/", 1)[0]
            name = key[: -len(".weight")]
            if component.startswith("text_encoder") and name.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
                name = "text_model." + name
            yield component, name, Placement(rel, key)
            return
        if self.arch == "flux":
            yield from self._flux_modules(key)
            return
        if key.startswith(UNET_PREFIX):
            inner = key[len(UNET_PREFIX): -len(".weight")]
            if is_sgm_name(inner):
                try:
                    yield "unet", sgm_to_diffusers(inner), Placement("", key)
                except (ValueError, IndexError):
                    pass
            return
        for component, (style, prefix) in SINGLE_FILE_TEXT.get(self.arch, {}).items():
            if not key.startswith(prefix):
                continue
            if style == "hf":
                yield component, key[len(prefix): -len(".weight")], Placement("", key)
            else:
                yield from self._openclip_modules(component, prefix, key)

    def _flux_modules(self, key: str):
        bfl = key[len(self.flux_prefix): -len(".weight")] if key.startswith(self.flux_prefix) else None
        if bfl is None or not flux.is_bfl_name(bfl):
            return
        try:
            target = flux.bfl_target(bfl)
        except KeyError:
            return
        for member in target.members:
            placement = self._flux_placement(member)
            if placement is not None:
                yield "transformer", member, placement

    def _openclip_modules(self, component: str, prefix: str, key: str):
        rest = key[len(prefix):]
        if rest == "text_projection":
            yield component, "text_projection", Placement("", key, transpose=True)
            return
        match = re.match(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$", rest)
        if not match:
            return
        layer, part = match.groups()
        base = f"text_model.encoder.layers.{layer}."
        if part == "attn.in_proj_weight":
            for x in "qkv":
                name = f"{base}self_attn.{x}_proj"
                yield component, name, self._openclip_placement(prefix, name)
        else:
            suffix = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                      "mlp.c_proj.weight": "mlp.fc2"}[part]
            yield component, base + suffix, Placement("", key)


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
