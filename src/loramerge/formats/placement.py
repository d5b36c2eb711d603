"""Which module of an architecture a LoRA key names.

For every architecture, component and naming, the names that exist come from the key tables
(the canonical modules of every full-size variant, encoded by the naming's scheme). A key's
module prefix matches a naming when it starts with the naming's prefix and the rest is one of
those names — exactly (``exact``), or up to the layer numbers (a model with more blocks than
the tables). kohya's flattened names ('.' → '_', ambiguous where attribute names contain '_')
are read back by matching them against the flattened known names, so no vocabulary of
underscore names is needed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from . import keymaps
from .archs import Architecture, Naming
from .schemes import Target, flatten, template

_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Match:
    """A key prefix read as a module (or a fused group of modules) of one architecture."""

    component: str
    naming: Naming
    target: Target
    exact: bool  # the name exists in a full-size model (not only up to its layer numbers)


class NameIndex:
    """The names one naming uses for one component, for exact, template and flattened look-ups."""

    def __init__(self, names: set[str]):
        self.exact = frozenset(names)
        self.templates = frozenset(template(n) for n in names)
        self._flat: dict[str, list[tuple[re.Pattern, str]]] = {}
        for t in self.templates:
            pieces = flatten(t).split("#")
            regex = re.compile(r"(\d+)".join(re.escape(p) for p in pieces))
            self._flat.setdefault(_DIGITS.sub("#", flatten(t)), []).append((regex, t))

    def dotted(self, name: str) -> bool | None:
        """True: an exact name; False: known up to layer numbers; None: unknown."""
        if name in self.exact:
            return True
        return False if template(name) in self.templates else None

    def unflatten(self, flat: str) -> list[str]:
        """Every dotted known name (template filled with the numbers) that flattens to ``flat``."""
        out = []
        for regex, dotted_template in self._flat.get(_DIGITS.sub("#", flat), ()):
            match = regex.fullmatch(flat)
            if match:
                numbers = iter(match.groups())
                out.append(re.sub("#", lambda _: next(numbers), dotted_template))
        return out


@functools.cache
def name_index(arch: Architecture, component: str, naming: Naming) -> NameIndex:
    names = set()
    for variant in arch.variants:
        for canonical in keymaps.table(variant).get(component, {}):
            encoded = naming.scheme.encode(canonical)
            if encoded is not None:
                names.add(encoded[0].name)
    return NameIndex(names)


def _candidates(index: NameIndex, naming: Naming, rest: str) -> list[tuple[str, bool]]:
    if naming.flat:
        return [(name, bool(index.dotted(name))) for name in index.unflatten(rest)]
    for name in [rest, *naming.scheme.aliases(rest)]:
        found = index.dotted(name)
        if found is not None:
            return [(name, found)]
    return []


def matches(arch: Architecture, prefix: str) -> list[Match]:
    """Every reading of one module prefix as a module of ``arch``, best first."""
    found: list[Match] = []
    for component in arch.components:
        for naming in component.read:
            if not prefix.startswith(naming.prefix) or len(prefix) == len(naming.prefix):
                continue
            index = name_index(arch, component.name, naming)
            for name, exact in _candidates(index, naming, prefix[len(naming.prefix):]):
                target = naming.scheme.decode(name)
                if target is not None:
                    found.append(Match(component.name, naming, target, exact))
    found.sort(key=lambda m: not m.exact)  # stable: naming order otherwise
    return found
