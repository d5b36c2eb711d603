"""Every tensor of a LoRA checked against the header and the architecture before any arithmetic.

From the header alone (no tensor data read, nothing allocated):
- roles: a module holds the keys of one kind (LoRA, LoHa, LoKr, full ``diff``), complete;
- dtypes: factors are floating point (integer, bool factors are refused naming the tensor;
  F8 factors are read as float and written as fp16, which holds every F8 value exactly); an
  alpha is one number;
- shapes: no empty tensor, no 1-D factor, ranks that agree (up/down/mid; LoHa's and LoKr's
  operands with each other), ``diff_b`` and ``lora_B.bias`` as long as the module's output;
- budgets: the weight a module changes is at most :data:`MAX_MODULE_ELEMENTS` elements (the
  largest real module, Flux.2-dev's fused single-block linear1 of 55296×6144, has 340 M) — a 65 KB LoKr whose two full Kronecker
  operands expand to a 16384×16384 weight is refused before it allocates gigabytes;
- after detection, a module whose name exists in the architecture's key tables may not be
  larger than that module is in any variant (:func:`check_real_shape`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import TYPE_CHECKING

import torch

from ..errors import FileFormatError, NotALoraError, ShapeMismatchError
from . import keymaps

if TYPE_CHECKING:  # pragma: no cover
    from .detect import Reading
    from .read import RawModule
    from .sources import TensorSource

MAX_MODULE_ELEMENTS = 1 << 30  # 1.07 G, 4 GiB as float32: 3× the largest real module (Flux.2-dev's linear1, 55296×6144)

F8 = {torch.float8_e4m3fn, torch.float8_e5m2}
_LORA = {"up", "down", "mid", "bias"}


def family(role: str) -> str | None:
    if role in _LORA:
        return "lora"
    if role.startswith("hada_"):
        return "loha"
    if role.startswith("lokr_"):
        return "lokr"
    if role == "diff":
        return "full"
    return None  # alpha, diff_b, dora, norm: shared


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a module's factors count as stored in: F8 is read as float (fp16 holds it)."""
    return torch.float16 if dtype in F8 else dtype


class _Checker:
    def __init__(self, raw: "RawModule", source: "TensorSource"):
        self.raw, self.source = raw, source
        self.shapes = {role: tuple(source.shape(key)) for role, key in raw.roles.items()}

    def fail(self, message: str, cls=ShapeMismatchError):
        raise cls(f"module {self.raw.prefix!r}: {message}", self.source.path)

    def key(self, role: str) -> str:
        return self.raw.roles[role]

    def ndim(self, role: str, *allowed: int) -> tuple[int, ...]:
        shape = self.shapes[role]
        if len(shape) not in allowed:
            dims = " or ".join(f"{n}-D" for n in allowed)
            what = "a 1-D factor has no rank" if len(shape) == 1 else f"expected {dims}"
            self.fail(f"tensor {self.key(role)!r} has shape {list(shape)}; {what}")
        return shape

    def equal(self, a: tuple[str, int], b: tuple[str, int], what: str) -> None:
        (ra, ia), (rb, ib) = a, b
        if self.shapes[ra][ia] != self.shapes[rb][ib]:
            self.fail(f"{what} disagree: {self.key(ra)!r} has {self.shapes[ra][ia]} "
                      f"({list(self.shapes[ra])}), {self.key(rb)!r} has {self.shapes[rb][ib]} ({list(self.shapes[rb])})")

    def require(self, *roles: str) -> None:
        missing = [r for r in roles if r not in self.raw.roles]
        if missing:
            have = ", ".join(sorted(self.raw.roles))
            self.fail(f"has {have} but no {', '.join(missing)}", NotALoraError)


def check_module(raw: "RawModule", source: "TensorSource") -> None:
    """Roles, dtypes and shapes of one module's tensors, from the header alone."""
    c = _Checker(raw, source)
    families = sorted({f for f in map(family, raw.roles) if f})
    if len(families) > 1:
        c.fail(f"mixes {' and '.join(families)} keys ({', '.join(sorted(raw.roles))}); a module is one kind",
               NotALoraError)
    for role, key in raw.roles.items():
        dtype, shape = source.dtype(key), c.shapes[role]
        if role == "alpha":
            if dtype == torch.bool or dtype.is_complex or math.prod(shape) != 1:
                c.fail(f"alpha {key!r} must be one number, not a {str(dtype).removeprefix('torch.')} tensor "
                       f"of shape {list(shape)}", FileFormatError)
            continue
        if role in ("dora", "norm", "ia3_on_input"):  # LyCORIS IA3's on_input is a flag (bool/int)
            continue
        if not dtype.is_floating_point:
            c.fail(f"tensor {key!r} is {str(dtype).removeprefix('torch.')}; LoRA factors are floating point",
                   FileFormatError)
        if math.prod(shape) == 0 or not shape:
            c.fail(f"tensor {key!r} is empty (shape {list(shape)}): a module of rank 0 changes nothing; "
                   "remove it from the file")
    kind = families[0] if families else None
    if kind == "lora":
        _check_lora(c)
    elif kind == "loha":
        _check_loha(c)
    elif kind == "lokr":
        _check_lokr(c)


def _check_lora(c: _Checker) -> None:
    c.require("up", "down")
    up = c.ndim("up", 2, 3, 4, 5)
    down = c.ndim("down", 2, 3, 4, 5)
    if any(s != 1 for s in up[2:]):
        c.fail(f"tensor {c.key('up')!r} has shape {list(up)}; an up factor's kernel is 1×1")
    if "mid" in c.shapes:
        c.ndim("mid", 4)
        c.equal(("up", 1), ("mid", 0), "ranks of up and mid")
        c.equal(("mid", 1), ("down", 0), "ranks of mid and down")
        if any(s != 1 for s in down[2:]):
            c.fail(f"tensor {c.key('down')!r} has shape {list(down)}; with lora_mid the down factor is 1×1")
    else:
        c.equal(("up", 1), ("down", 0), "ranks of up and down")
    if "bias" in c.shapes:
        c.ndim("bias", 1)
        c.equal(("bias", 0), ("up", 0), "output sizes of lora_B.bias and lora_B")


def _check_loha(c: _Checker) -> None:
    c.require("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    tucker = [t for t in ("hada_t1", "hada_t2") if t in c.shapes]
    if tucker and len(tucker) != 2:
        c.fail("has one Tucker core of hada_t1/hada_t2 but not the other", NotALoraError)
    for i in (1, 2):
        c.ndim(f"hada_w{i}_a", 2)
        if tucker:
            c.ndim(f"hada_w{i}_b", 2)
            c.ndim(f"hada_t{i}", 4)
            c.equal((f"hada_t{i}", 0), (f"hada_w{i}_a", 0), f"ranks of hada_t{i} and hada_w{i}_a")
            c.equal((f"hada_t{i}", 1), (f"hada_w{i}_b", 0), f"ranks of hada_t{i} and hada_w{i}_b")
        else:
            c.ndim(f"hada_w{i}_b", 2, 3, 4, 5)
            c.equal((f"hada_w{i}_a", 1), (f"hada_w{i}_b", 0), f"ranks of hada_w{i}_a and hada_w{i}_b")
    if tucker:
        c.equal(("hada_w1_a", 1), ("hada_w2_a", 1), "output sizes of hada_w1_a and hada_w2_a")
        c.equal(("hada_w1_b", 1), ("hada_w2_b", 1), "input sizes of hada_w1_b and hada_w2_b")
        if c.shapes["hada_t1"][2:] != c.shapes["hada_t2"][2:]:
            c.fail("the kernels of hada_t1 and hada_t2 disagree")
    else:
        c.equal(("hada_w1_a", 0), ("hada_w2_a", 0), "output sizes of hada_w1_a and hada_w2_a")
        if c.shapes["hada_w1_b"][1:] != c.shapes["hada_w2_b"][1:]:
            c.fail(f"input sizes of hada_w1_b {list(c.shapes['hada_w1_b'])} and hada_w2_b "
                   f"{list(c.shapes['hada_w2_b'])} disagree")


def _check_lokr(c: _Checker) -> None:
    for i in (1, 2):
        full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        given = [r for r in (full, a, b) if r in c.shapes]
        if full in c.shapes and len(given) > 1:
            c.fail(f"gives Kronecker operand {i} twice ({', '.join(given)})", NotALoraError)
        if full in c.shapes:
            c.ndim(full, 2) if i == 1 else c.ndim(full, 2, 3, 4, 5)
            continue
        if not given:
            c.fail(f"has no Kronecker operand {i} (lokr_w{i} or lokr_w{i}_a and lokr_w{i}_b)", NotALoraError)
        c.require(a, b)
        c.ndim(a, 2)
        if i == 2 and "lokr_t2" in c.shapes:
            c.ndim(b, 2)
            c.ndim("lokr_t2", 4)
            c.equal(("lokr_t2", 0), (a, 0), "ranks of lokr_t2 and lokr_w2_a")
            c.equal(("lokr_t2", 1), (b, 0), "ranks of lokr_t2 and lokr_w2_b")
        else:
            c.ndim(b, 2) if i == 1 else c.ndim(b, 2, 3, 4, 5)
            c.equal((a, 1), (b, 0), f"ranks of {a} and {b}")
    if "lokr_t2" in c.shapes and "lokr_w2" in c.shapes:
        c.fail("gives lokr_t2 with a full lokr_w2", NotALoraError)


def check_size(prefix: str, shape: tuple[int, ...], source: "TensorSource") -> None:
    """The weight a module changes must fit the budget (its dense ΔW is built for fusing)."""
    n = math.prod(shape)
    if n > MAX_MODULE_ELEMENTS:
        raise ShapeMismatchError(
            f"module {prefix!r} would change a {'×'.join(map(str, shape))} weight ({n:,} elements), larger "
            f"than any real model's module (limit {MAX_MODULE_ELEMENTS:,}); refusing to expand it", source.path)


def check_bias(raw: "RawModule", shape: tuple[int, ...], source: "TensorSource") -> None:
    """``diff_b`` is a change of the module's bias: one value per output."""
    if "diff_b" in raw.roles:
        got = tuple(source.shape(raw.roles["diff_b"]))
        if got != (shape[0],):
            raise ShapeMismatchError(
                f"module {raw.prefix!r}: diff_b has shape {list(got)}, but the module has {shape[0]} outputs",
                source.path)


def check_real_shape(prefix: str, shape: tuple[int, ...], reading: "Reading", source: "TensorSource") -> None:
    """A module named exactly as a real module may be smaller than it (a small model with the
    same names: the tiny world, tests) but not larger than it is in any variant."""
    from .detect import flat, member_shapes

    match = reading.chosen[prefix]
    if not match.exact:
        return
    members = member_shapes(match, shape) or []
    for name, member_shape in members:
        real = [keymaps.table(v).get(match.component, {}).get(name) for v in reading.arch.variants]
        real = [flat(tuple(r)) for r in real if r]
        if not real:
            continue
        rows, cols = flat(member_shape)
        if rows > max(r for r, _ in real) or cols > max(c for _, c in real):
            biggest = max(real)
            raise ShapeMismatchError(
                f"module {prefix!r} changes a {rows}×{cols} weight, but {match.component}.{name} is at most "
                f"{biggest[0]}×{biggest[1]} in any {reading.arch.name} model", source.path)


_DIGITS = re.compile(r"\d+")


@functools.cache
def _number_ranges(arch_name: str, component: str) -> dict[str, tuple[int, ...]]:
    """For each module name up to its numbers (``up_blocks.#.attentions.#.…``), the largest
    number at each position over every variant's key table."""
    from . import archs

    ranges: dict[str, tuple[int, ...]] = {}
    for variant in archs.spec(arch_name).variants:
        for name in keymaps.table(variant).get(component, {}):
            numbers = tuple(int(n) for n in _DIGITS.findall(name))
            old = ranges.get(_DIGITS.sub("#", name))
            ranges[_DIGITS.sub("#", name)] = numbers if old is None else tuple(map(max, old, numbers))
    return ranges


def beyond_tables(arch_name: str, component: str, names) -> bool:
    """True when a module name has a block or layer number larger than every variant of the
    architecture has at that place (``down_blocks.99`` on SD1); a name within those ranges
    (a smaller model laid out differently, like the tiny world's UNet) is not beyond."""
    ranges = _number_ranges(arch_name, component)
    for name in names:
        largest = ranges.get(_DIGITS.sub("#", name))
        numbers = [int(n) for n in _DIGITS.findall(name)]
        if largest is None or any(n > m for n, m in zip(numbers, largest)):
            return True
    return False


_NUMBER = (int, float)


def finite_number(value) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def check_peft_config(config, where: str, path) -> dict:
    """A LoraConfig (one component's ``lora_adapter_metadata`` or an ``adapter_config.json``):
    the fields loramerge reads must have their types; anything else is refused, never ignored
    (a silent fallback would read every module at alpha = rank)."""
    def fail(problem: str):
        raise NotALoraError(f"{where}: {problem}", path)

    if not isinstance(config, dict):
        fail(f"expected a JSON object of LoraConfig fields, got {type(config).__name__}")
    if "lora_alpha" in config and not finite_number(config["lora_alpha"]):
        fail(f"lora_alpha must be a finite number, got {config['lora_alpha']!r:.40}")
    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0):
        fail(f"r must be a positive integer, got {config['r']!r:.40}")
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        fail(f"use_rslora must be true or false, got {config['use_rslora']!r:.40}")
    for field in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            fail(f"{field} must map module patterns to numbers, got {type(patterns).__name__}")
        for pattern, value in patterns.items():
            if not finite_number(value):
                fail(f"{field}[{pattern!r:.60}] must be a finite number, got {value!r:.40}")
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                fail(f"{field} key {pattern!r:.60} is not a valid regular expression ({exc})")
    return config
