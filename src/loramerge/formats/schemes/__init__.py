"""Naming schemes: how a family of files names a model's modules, mapped to and from the
canonical (diffusers) module names, both ways.

A scheme turns a name in its own spelling into a :class:`Target`: the canonical modules that
name holds. Most names hold one module; a *fused* name holds several stacked along the output
rows (BFL's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k``, ``to_v``), with their relative
row counts. ``encode`` goes the other way: a canonical module → (its target, its position in
it). Schemes know names only; which names exist comes from an architecture's key tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


@dataclass(frozen=True)
class Target:
    """One module as a scheme names it, and the canonical modules it holds (row order)."""

    name: str
    members: tuple[str, ...]
    ratios: tuple[int, ...] = (1,)  # relative output rows of the members
    # the scheme's two output halves are swapped (shift, scale ↔ scale, shift): True, or k to swap
    # only a weight of k·(input width) rows (SD3's last context block alone has 2 chunks, not 6)
    swap_halves: bool | int = False
    transpose: bool = False  # the checkpoint stores the weight transposed
    weight_key: str | None = None  # checkpoint tensor when it is not f"{name}.weight"

    @property
    def fused(self) -> bool:
        return len(self.members) > 1

    def rows(self, total: int) -> list[tuple[int, int]]:
        """Each member's [start, end) rows in a fused weight of ``total`` rows."""
        if total % sum(self.ratios):
            raise ValueError(f"{self.name}: {total} rows do not divide in the ratios {self.ratios}")
        unit, start, spans = total // sum(self.ratios), 0, []
        for r in self.ratios:
            spans.append((start, start + unit * r))
            start += unit * r
        return spans

    def swaps(self, rows: int, cols: int) -> bool:
        if isinstance(self.swap_halves, bool):
            return self.swap_halves
        return rows == self.swap_halves * cols

    @property
    def checkpoint_key(self) -> str:
        return self.weight_key or f"{self.name}.weight"


class Scheme:
    """Base class: ``decode`` a scheme name, ``encode`` a canonical name; ``None`` = not mine."""

    name = "scheme"

    def decode(self, name: str) -> Target | None:
        raise NotImplementedError

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        raise NotImplementedError

    def aliases(self, name: str) -> list[str]:
        """Other spellings of a name that mean the same module (old files), tried after it."""
        return []

    def __repr__(self) -> str:
        return f"<scheme {self.name}>"


class Identity(Scheme):
    """Canonical names themselves (diffusers / PEFT files), with ``fixes``: spellings of older
    files rewritten to the canonical one (each a function returning a new name or None)."""

    def __init__(self, name: str = "diffusers", fixes: Sequence[Callable[[str], str | None]] = ()):
        self.name = name
        self.fixes = tuple(fixes)

    def decode(self, name: str) -> Target | None:
        return Target(name, (name,))

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        return Target(canonical, (canonical,)), 0

    def aliases(self, name: str) -> list[str]:
        out = []
        for fix in self.fixes:
            fixed = fix(name)
            if fixed and fixed != name and fixed not in out:
                out.append(fixed)
        return out


@dataclass(frozen=True)
class Rule:
    """``scheme`` ↔ ``members``, where ``{i}`` (and ``{j}``) stand for layer numbers."""

    scheme: str
    members: tuple[str, ...]
    ratios: tuple[int, ...] | None = None  # default: equal rows
    swap_halves: bool | int = False


def _pattern(text: str) -> re.Pattern:
    escaped = re.escape(text).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(escaped + "$")


class RuleScheme(Scheme):
    """A scheme given as a table of :class:`Rule` s (BFL, MMDiT, the video models' originals…).

    Canonical names no rule covers are, with ``passthrough``, spelled the same in the scheme
    (many original checkpoints share most names with diffusers)."""

    def __init__(self, name: str, rules: Sequence[Rule], passthrough: bool = False):
        self.name = name
        self.rules = tuple(rules)
        self.passthrough = passthrough
        self._decode = [(_pattern(r.scheme), r) for r in self.rules]
        self._encode = [(_pattern(m), r, pos) for r in self.rules for pos, m in enumerate(r.members)]

    def _target(self, rule: Rule, numbers: dict[str, str]) -> Target:
        members = tuple(m.format(**numbers) for m in rule.members)
        ratios = rule.ratios or (1,) * len(members)
        return Target(rule.scheme.format(**numbers), members, ratios, rule.swap_halves)

    def decode(self, name: str) -> Target | None:
        for pattern, rule in self._decode:
            match = pattern.match(name)
            if match:
                return self._target(rule, match.groupdict())
        if self.passthrough and not any(p.match(name) for p, _, _ in self._encode):
            return Target(name, (name,))
        return None

    def encode(self, canonical: str) -> tuple[Target, int] | None:
        for pattern, rule, position in self._encode:
            match = pattern.match(canonical)
            if match:
                return self._target(rule, match.groupdict()), position
        if self.passthrough:
            return Target(canonical, (canonical,)), 0
        return None


def template(name: str) -> str:
    """A dotted name with its layer numbers (whole numeric components) replaced by '#'."""
    return _NUMBER.sub("#", name)


def flatten(dotted: str) -> str:
    """kohya's spelling: every '.' becomes '_' (ambiguous; see :mod:`..placement`)."""
    return dotted.replace(".", "_")
