"""Which architecture a LoRA belongs to, from its keys, their shapes and what the file says.

1. Every architecture tries to place every module (:mod:`.placement`): first with exact names,
   then — if no architecture places them all — up to layer numbers (larger custom models).
2. Among those that place everything, full-size shapes: the architecture (and variant) whose
   real modules have the most of the file's shapes.
3. Among those that fit equally, a trained LoRA covers its model's blocks: the architecture
   whose last block of each kind the file reaches (Flux's 19 double blocks vs HunyuanVideo's
   20, same names and widths). Then the file's own words decide: ``ss_base_model_version``,
   ``modelspec.architecture``, a PEFT folder's ``base_model_name_or_path`` (kohya's and ComfyUI's
   key prefixes already narrowed the field in step 1: ``lora_te_`` exists only in SD1/SD2…).
   A header contradicted by the shapes loses: files copy headers, not shapes.
4. Still several? The file fits each of them equally: :class:`AmbiguousArchitectureError` names
   the candidates and asks for ``--arch``; nothing is picked silently.
Variants of one architecture whose keys and shapes are identical are told apart the same way:
by the header when it names one (:attr:`Identity.variant_names`), else left undetermined.
A file that fits an architecture except for modules of a part it does not read (its
:attr:`Architecture.unsupported` prefixes) is refused with the reason, naming that part.
Within the architecture, variants whose shapes fit equally (Wan 2.1 T2V-14B and a Wan 2.2 A14B
expert) leave the variant undetermined (``Reading.also``) unless the header names one of them
(``loramerge.variant``, or ``modelspec.architecture`` = ``<variant>/lora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import AmbiguousArchitectureError, NotALoraError, UnsupportedModuleError
from . import archs, keymaps
from .archs import Architecture
from .placement import Match, matches

Shape = tuple[int, ...]


@dataclass
class Reading:
    """An architecture's reading of a file: which match each module prefix gets."""

    arch: Architecture
    variant: str
    chosen: dict[str, Match]
    misfits: list[str] = field(default_factory=list)
    shape_hits: int = 0
    also: tuple[str, ...] = ()  # variants that fit as well as ``variant``


def flat(shape: Shape) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (0, 0)


def member_shapes(match: Match, shape: Shape) -> list[tuple[str, Shape]] | None:
    """The canonical modules a match covers, with their weight shapes (None: rows don't split)."""
    target = match.target
    if not target.fused:
        return [(target.members[0], shape)]
    try:
        spans = target.rows(shape[0])
    except ValueError:
        return None
    return [(m, (b - a, *shape[1:])) for m, (a, b) in zip(target.members, spans)]


def _fits(match: Match, shape: Shape, table: dict) -> bool:
    members = member_shapes(match, shape)
    if not members:
        return False
    known = table.get(match.component, {})
    return all(m in known and flat(known[m]) == flat(s) for m, s in members)


def read_as(arch: Architecture, modules: dict[str, Shape], exact_only: bool) -> Reading:
    """Place every module prefix on ``arch``; pick the variant whose shapes fit best."""
    options: dict[str, list[Match]] = {}
    misfits = []
    for prefix, shape in modules.items():
        found = [m for m in matches(arch, prefix) if (m.exact or not exact_only) and member_shapes(m, shape)]
        if found:
            options[prefix] = found
        else:
            misfits.append(prefix)
    tables = {v: keymaps.table(v) for v in arch.variants}
    hits = {v: sum(any(_fits(m, modules[p], t) for m in ms) for p, ms in options.items()) for v, t in tables.items()}
    best = max(hits.values())
    ranked = [v for v in arch.variants if hits[v] == best]
    table = tables[ranked[0]]
    chosen = {p: next((m for m in ms if _fits(m, modules[p], table)), ms[0]) for p, ms in options.items()}
    return Reading(arch, ranked[0], chosen, misfits, best, tuple(ranked[1:]))


def last_blocks_reached(reading: Reading) -> int:
    """How many block kinds of the reading's variant have their last block in the file."""
    denoisers = reading.arch.denoisers

    def kind_index(name: str) -> tuple[str, int] | None:
        block = reading.arch.blocks.block_of(name)
        kind, _, index = (block or "").partition(".")
        return (kind, int(index)) if index.isdigit() else None  # DiT grammars only (kind.i)

    last: dict[str, int] = {}
    for component in denoisers:
        for found in filter(None, map(kind_index, keymaps.table(reading.variant).get(component, {}))):
            last[found[0]] = max(last.get(found[0], 0), found[1])
    reached = {found[0] for m in reading.chosen.values() if m.component in denoisers
               for found in filter(None, map(kind_index, m.target.members)) if last.get(found[0]) == found[1]}
    return len(reached)


def claims(metadata: dict[str, str], config: dict | None) -> tuple[set[str], list[str]]:
    """Architectures the file's own header or adapter config names, and where it says so. A
    header value names the architectures with the longest alias it starts with ('flux2_klein'
    is Flux.2's 'flux2', not Flux.1's 'flux')."""
    found: set[str] = set()
    said: list[str] = []
    version = str(metadata.get("ss_base_model_version", "")).lower()
    modelspec = str(metadata.get("modelspec.architecture", "")).lower()
    base = str((config or {}).get("base_model_name_or_path") or "").lower() if isinstance(config, dict) else ""
    everything = list(archs.registry().values())
    fields = (
        ("ss_base_model_version", version, lambda ident: ident.ss_aliases, str.startswith),
        ("modelspec.architecture", modelspec, lambda ident: ident.modelspec_aliases, str.startswith),
        ("base_model_name_or_path", base, lambda ident: ident.base_models, lambda text, a: a in text),
    )
    for field_name, value, aliases, fits in fields:
        if not value:
            continue
        longest = {a.name: max((len(x) for x in aliases(a.identity) if fits(value, x)), default=0) for a in everything}
        best = max(longest.values())
        if best:
            found |= {name for name, n in longest.items() if n == best}
            said.append(f"{field_name}={value!r}")
    return found, sorted(set(said))


def _stem(value) -> str:
    return str(value or "").strip().lower().split("/")[0]


def named_variant(reading: Reading, metadata: dict[str, str]) -> str | None:
    """The variant of a reading: the one the shapes pick or, among variants the shapes cannot
    tell apart, the one the header names — ``loramerge.variant``, a ``modelspec.architecture``
    of ``<variant>/lora``, or a value the entry lists for it (:attr:`Identity.variant_names`);
    None when nothing decides."""
    if not reading.also:
        return reading.variant
    said = {_stem(metadata.get(f)) for f in ("modelspec.architecture", "ss_base_model_version", "loramerge.variant")}
    ident = reading.arch.identity
    # values naming the architecture (written for any of its variants) name no variant
    said -= {"", _stem(ident.modelspec_architecture), _stem(ident.ss_base_model_version),
             *ident.ss_aliases, *ident.modelspec_aliases}
    names = ident.variant_names
    named = [v for v in (reading.variant, *reading.also)
             if said & ({v.lower()} | {_stem(n) for n in names.get(v, ())})]
    return named[0] if len(named) == 1 else None


def _shown(prefixes: list[str]) -> str:
    return ", ".join(prefixes[:8]) + (f" and {len(prefixes) - 8} more" if len(prefixes) > 8 else "")


def _refuse_unsupported(readings: list[Reading], path) -> None:
    """Raise when some architecture places every module but those of a part it refuses."""
    for reading in sorted(readings, key=lambda r: -len(r.chosen)):
        if not reading.chosen or not reading.arch.unsupported:
            continue
        parts: dict = {}
        for prefix in reading.misfits:
            part = next((u for u in reading.arch.unsupported if prefix.startswith(u.prefixes)), None)
            if part is None:
                break
            parts.setdefault(part, []).append(prefix)
        else:
            part, prefixes = next(iter(parts.items()))
            raise UnsupportedModuleError(
                f"{len(prefixes)} modules are LoRA modules of the {reading.arch.label} {part.component} "
                f"({part.reason}); loramerge does not read them: {_shown(prefixes)}", path)


def detect(modules: dict[str, Shape], metadata: dict[str, str], config: dict | None = None,
           forced: str | None = None, path=None) -> Reading:
    """The reading of ``modules`` ({module prefix: weight shape}) by the architecture they fit."""
    candidates = [archs.spec(forced)] if forced else list(archs.registry().values())
    readings: list[Reading] = []
    for exact_only in (True, False):
        readings = [read_as(a, modules, exact_only) for a in candidates]
        placed = [r for r in readings if not r.misfits]
        if placed:
            break
    else:
        _refuse_unsupported(readings, path)
        closest = min(readings, key=lambda r: len(r.misfits))
        shown = _shown(closest.misfits)
        where = f"a {closest.arch.name} LoRA" if forced else f"any known architecture (closest: {closest.arch.name})"
        raise NotALoraError(f"cannot place {len(closest.misfits)} of {len(modules)} modules on {where}; "
                            f"unmapped: {shown}", path)
    best = max(r.shape_hits for r in placed)
    top = [r for r in placed if r.shape_hits == best]
    if len(top) > 1:
        reach = {id(r): last_blocks_reached(r) for r in top}
        most = max(reach.values())
        top = [r for r in top if reach[id(r)] == most]
    if len(top) == 1:
        return top[0]
    claimed, said = claims(metadata, config)
    agreeing = [r for r in top if r.arch.name in claimed]
    if len(agreeing) == 1:
        return agreeing[0]
    top = agreeing or top
    names = tuple(r.arch.name for r in top)
    why = f" (the header says {', '.join(said)}, which does not decide)" if said else ""
    headers = "; ".join(f"{r.arch.name}: {'/'.join(r.arch.identity.modelspec_aliases[:2] or r.arch.identity.ss_aliases[:2])}"
                        for r in top)
    raise AmbiguousArchitectureError(
        f"keys and shapes fit {len(names)} architectures equally: {', '.join(names)}{why}; "
        f"give --arch {names[0]} (or one of the others), or a modelspec.architecture naming one ({headers})",
        path, names)
