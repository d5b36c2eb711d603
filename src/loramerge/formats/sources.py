"""Where a LoRA's tensors come from: a safetensors file (lazy, mmap), or a pickled checkpoint
that ``torch.load(weights_only=True)`` accepts (anything else is refused, never unpickled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import FileFormatError
from . import cloneofsimo
from .safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Files a PEFT / diffusers save_pretrained folder holds its LoRA in.
FOLDER_WEIGHTS = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


class TensorSource:
    """Uniform access: names, shapes and dtypes from the header; data read one tensor at a time."""

    path: Path
    metadata: dict[str, str]
    extra_config: dict | None = None  # adapter_config.json of a PEFT folder
    format: str | None = None  # the format's name when the source itself knows it (renamed keys)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        self._file = SafetensorsFile(path)
        self.path = path
        self.metadata = self._file.metadata

    def keys(self):
        return self._file.keys()

    def shape(self, key):
        return self._file.infos[key].shape

    def dtype(self, key):
        return self._file.infos[key].dtype

    def get(self, key):
        return self._file.get(key)


class DictSource(TensorSource):
    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata=None):
        self.path = path
        self._tensors = tensors
        self.metadata = metadata or {}

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key):
        return self._tensors[key]


def weights_file(path: str | os.PathLike) -> Path:
    """The file holding a LoRA's tensors (a PEFT folder's weights file, or the path itself)."""
    path = Path(path)
    if path.is_dir():
        for name in FOLDER_WEIGHTS:
            if (path / name).is_file():
                return path / name
    return path


def open_source(path: str | os.PathLike) -> TensorSource:
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _open_pickle(path)
    source = SafetensorsSource(path)
    if cloneofsimo.is_cloneofsimo(source.keys()):  # unnamed entries: renamed by their known order
        return _cloneofsimo_source(path, {k: source.get(k) for k in source.keys()}, source.metadata)
    return source


def _open_folder(path: Path) -> TensorSource:
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            source = SafetensorsSource(path / name)
            config = path / "adapter_config.json"
            if config.is_file():
                source.extra_config = _adapter_config(config)
            return source
    raise FileFormatError(f"folder holds none of {', '.join(FOLDER_WEIGHTS)}", path)


def _adapter_config(path: Path) -> dict:
    """A PEFT folder's adapter_config.json: UTF-8 JSON, an object whose LoraConfig fields have
    their types (or the folder is refused: its alphas would be guessed)."""
    from .validate import check_peft_config

    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError("adapter_config.json is not UTF-8 text", path) from None
    except (ValueError, RecursionError):
        raise FileFormatError("adapter_config.json is not valid JSON", path) from None
    except OSError as exc:
        raise FileFormatError(f"cannot read adapter_config.json: {exc.strerror or exc}", path) from None
    return check_peft_config(data, "adapter_config.json", path)


def _open_pickle(path: Path) -> TensorSource:
    if not path.is_file():
        raise FileFormatError("no such file", path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(
            f"refusing to load: torch.load(weights_only=True) rejected this pickle ({first})", path
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, list) and data and all(isinstance(v, torch.Tensor) for v in data):
        return _cloneofsimo_source(path, data, {})  # cloneofsimo's [up, down, …]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FileFormatError("pickle does not hold a flat dict of tensors", path)
    return DictSource(path, data)


def _cloneofsimo_source(path: Path, tensors, metadata: dict[str, str]) -> DictSource:
    renamed, header = cloneofsimo.to_canonical(path, tensors, metadata)
    source = DictSource(path, renamed, header)
    source.format = cloneofsimo.FORMAT
    return source
