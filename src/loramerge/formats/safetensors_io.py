"""safetensors reading with every failure named, and a deterministic, atomic, streaming writer.

We validate the header ourselves (so a truncated or corrupt file gets a clear one-line error
instead of a Rust panic), read tensors lazily through ``safetensors.safe_open`` (mmap), and
write files ourselves: the header is built in a fixed order, so the same tensors and metadata
always give the same bytes, and tensors can be streamed one at a time (checkpoint fusing).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import FileFormatError
from ..outputs import Staged, output_error

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a model file but garbage read as a length.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Budgets checked on the raw header bytes before it is parsed, so a header built to exhaust
# memory (a million zero-size tensors, millions of tiny entries) is refused in milliseconds.
# The largest real files (a full SDXL/Flux checkpoint, a LyCORIS LoRA on every module) list a
# few thousand tensors and a few hundred thousand JSON tokens.
MAX_TENSORS = 100_000
_MAX_HEADER_TOKENS = 4_000_000  # '{', '[', ':' and ',' (those inside strings counted too)
_MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensor infos (in file order) and metadata."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not stat.S_ISREG(path.stat().st_mode):
            raise FileFormatError("not a regular file", path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FileFormatError(f"not a safetensors file: only {size} bytes", path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise FileFormatError("not a safetensors file: header length is implausible", path)
            if 8 + header_len > size:
                raise FileFormatError(
                    f"truncated file: header needs {8 + header_len} bytes, file has {size}", path
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise FileFormatError("no such file", path) from None
    except IsADirectoryError:
        raise FileFormatError("is a directory, expected a .safetensors file", path) from None
    except PermissionError:
        raise FileFormatError("permission denied", path) from None
    except OSError as exc:
        raise FileFormatError(f"cannot read: {exc.strerror or exc}", path) from None
    header = _parse_header_json(raw, path)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FileFormatError("corrupt header: __metadata__ must map strings to strings", path)

    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry)
    ordered = dict(sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)))
    _check_layout(path, list(ordered.values()), data_size)
    return ordered, dict(metadata)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_header_json(raw: bytes, path: Path) -> dict:
    tensors = raw.count(b'"data_offsets"')
    if tensors > MAX_TENSORS:
        raise FileFormatError(f"header lists {tensors} tensors, more than the {MAX_TENSORS} loramerge reads", path)
    tokens = sum(raw.count(c) for c in (b"{", b"[", b":", b","))
    if tokens > _MAX_HEADER_TOKENS:
        raise FileFormatError(f"header is too complex ({tokens} JSON tokens, more than {_MAX_HEADER_TOKENS})", path)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise FileFormatError("not a safetensors file: header is not UTF-8", path) from None
    except RecursionError:
        raise FileFormatError("not a safetensors file: header JSON is nested too deeply", path) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(":")[0]
        raise FileFormatError(f"not a safetensors file: header is not valid JSON ({why})", path) from None
    if not isinstance(header, dict):
        raise FileFormatError("not a safetensors file: header is not a JSON object", path)
    return header


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    corrupt = FileFormatError(f"corrupt header entry for tensor {name!r}", path)
    if not isinstance(entry, dict):
        raise corrupt
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise corrupt
    if not all(_int(s) for s in shape) or len(offsets) != 2 or not all(_int(x) for x in offsets):
        raise corrupt
    if dtype_name not in DTYPES:
        raise FileFormatError(f"tensor {name!r} has unsupported dtype {dtype_name[:20]!r}", path)
    if len(shape) > _MAX_DIMS:
        raise FileFormatError(f"tensor {name!r} has {len(shape)} dimensions; no LoRA or model tensor has more "
                              f"than {_MAX_DIMS}", path)
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    info = TensorInfo(name, dtype, tuple(shape), begin, end)
    if any(s < 0 for s in shape) or begin < 0 or end - begin != info.numel * dtype.itemsize:
        raise FileFormatError(f"corrupt header: size of tensor {name!r} does not match its shape", path)
    return info


def _check_layout(path: Path, infos: list[TensorInfo], data_size: int) -> None:
    """Tensors lie back to back and fill the data section exactly (what safetensors writes and
    requires): no overlaps, no gaps, nothing past the end."""
    position = 0
    for info in infos:
        if info.end > data_size:
            raise FileFormatError(
                f"truncated file: tensor {info.name!r} ends at byte {info.end} of the data section, "
                f"which has only {data_size} bytes",
                path,
            )
        if info.begin != position:
            what = "overlaps the tensor before it" if info.begin < position else "leaves a gap before it"
            raise FileFormatError(f"corrupt header: tensor {info.name!r} {what}", path)
        position = info.end
    if position != data_size:
        raise FileFormatError(f"corrupt file: {data_size - position} bytes after the last tensor", path)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read one at a time on request."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        with open(self.path, "rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # the header passed our checks; anything else is corruption
            raise FileFormatError(f"cannot open: {exc}", self.path) from None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise FileFormatError(f"cannot read tensor {name!r}: {exc}", self.path) from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor with a plain file read instead of the memory map: pages of a
        multi-GB checkpoint then never pile up in the process's resident memory."""
        info = self.infos[name]
        buffer = bytearray(info.end - info.begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.begin)
            if f.readinto(buffer) != len(buffer):
                raise FileFormatError(f"truncated file: cannot read tensor {name!r}", self.path)
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order tensors are laid out in: widest dtype first (keeps data aligned), then by name."""
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))


def _build_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be strings: {bad[:3]}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy when it is already contiguous on CPU."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class StreamingWriter:
    """Writes a safetensors file tensor by tensor to a temp file, renamed into place on success
    (:class:`~loramerge.outputs.Staged`).

    The header (all names, dtypes, shapes) is fixed up front; tensors must then be written in
    ``self.order``. Use as a context manager: an exception (or SIGTERM) removes the temp file,
    so a failed run never leaves a partial output.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata=None):
        self.path = Path(path)
        self.order = file_order(specs)
        self._next = 0
        header = _build_header(self.order, metadata)
        self._staged = Staged([self.path])
        (self._tmp,) = self._staged.temps
        try:
            self._f = open(self._tmp, "wb")
            self._f.write(header)
        except OSError as exc:
            self._staged.abort()
            raise output_error(exc, self.path) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.order[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"header says {spec.dtype} {spec.shape}"
            )
        try:
            self._f.write(tensor_bytes(tensor))
        except OSError as exc:
            raise output_error(exc, self.path) from None
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            missing = self.order[self._next].name
            self.abort()
            raise ValueError(f"tensor {missing!r} was never written")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as exc:
            self.abort()
            raise output_error(exc, self.path) from None
        self._staged.commit()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self._staged.abort()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata=None) -> None:
    """Atomically write ``tensors`` (deterministic bytes for the same input)."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with StreamingWriter(path, specs, metadata) as writer:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name])


def iter_tensors(file: SafetensorsFile) -> Iterator[tuple[str, torch.Tensor]]:
    for name in file.keys():
        yield name, file.get(name)
