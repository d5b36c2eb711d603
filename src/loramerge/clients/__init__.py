"""What diffusers, ComfyUI, A1111 and Forge will do with a LoRA file: ``loramerge check``.

Each client is a small module here restating its loader (sources and versions read:
docs/notes/clients.md §0); what differs per architecture — which of its loaders runs, which key
spellings it maps — is data the architecture entry carries (:class:`..formats.archs.ClientFacts`).

A client reads a file module by module (:class:`Application`: where it applies the module, at
which scale, whether it applies its bias delta) and may reject or ignore the whole file.
:func:`check` compares that with this package's own reading of the file — per canonical module,
the ΔW the file means (scale · its factors, on the modules it names) — and reports, per client,
what is applied exactly, what is ignored and so lost, what is applied at a different scale or to
other modules, and whole-file outcomes. Both readings use the same tensors, so comparing the
target modules (row slices of fused ones included) and the scales compares the ΔW.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..formats import archs
from ..formats.archs import Architecture, ClientFacts
from ..formats.read import kind_of, parse
from ..formats.schemes import Target
from ..formats.sources import TensorSource, open_source

CLIENTS = ("diffusers", "comfyui", "a1111", "forge")
REL_TOL = 1e-6  # scales closer than this are the same scale (alphas are stored as float32)


@dataclass
class FileModule:
    """One module as the file names it, and what this package reads it as."""

    prefix: str  # the keys' common start, as written (PEFT's base_model.model. included)
    keys: dict[str, str]  # role (down, up, mid, alpha, bias, diff, diff_b, hada_w1_a…) → key
    shapes: dict[str, tuple[int, ...]]
    kind: str  # lora, loha, lokr, full
    component: str
    target: Target  # the canonical module(s) it changes (fused: row blocks in order)
    scale: float  # ΔW = scale · (product of its factors)
    alpha: float | None  # the value of its alpha key
    exact: bool = True  # its name exists in a full-size model (else only up to layer numbers)
    label: str = "?"  # the format its naming belongs to (kohya, diffusers, comfyui…)

    def suffix(self, role: str) -> str:
        return self.keys[role][len(self.prefix):]

    @property
    def has_bias(self) -> bool:
        return "diff_b" in self.keys or "bias" in self.keys

    @property
    def modules(self) -> list[str]:
        return [f"{self.component}.{m}" for m in self.target.members]

    @property
    def rank(self) -> int | None:
        return self.shapes["down"][0] if "down" in self.shapes else None


@dataclass
class FileView:
    path: str
    arch: Architecture
    variant: str
    metadata: dict[str, str]
    keys: list[str]  # in file order
    modules: list[FileModule]
    source: TensorSource = field(repr=False)

    def module_of(self) -> dict[str, FileModule]:
        return {key: m for m in self.modules for key in m.keys.values()}


def view(source: TensorSource | str | os.PathLike, arch: str | None = None) -> FileView:
    """Read a file (or an in-memory source) the way ``check`` needs it."""
    if not isinstance(source, TensorSource):
        source = open_source(source)
    parsed = parse(source, arch)
    modules = []
    for raw in parsed.raw_modules:
        match = parsed.match(raw)
        alpha = float(source.get(raw.roles["alpha"]).float().reshape(-1)[0]) if "alpha" in raw.roles else None
        modules.append(FileModule(
            raw.prefix, dict(raw.roles), {r: tuple(source.shape(k)) for r, k in raw.roles.items()}, kind_of(raw),
            match.component, match.target, parsed.scale(raw), alpha, match.exact, match.naming.label,
        ))
    return FileView(str(source.path), parsed.reading.arch, parsed.reading.variant, dict(source.metadata),
                    list(source.keys()), modules, source)


# --------------------------------------------------------------------------------------------
# what a client does, and the verdict


@dataclass
class Application:
    """What one client does with one file module."""

    module: FileModule
    component: str | None = None
    target: Target | None = None  # None: not applied
    scale: float | None = None
    bias: bool = False  # its bias delta applied
    used: tuple[str, ...] = ()  # the file keys the client takes for it
    why: str = ""  # why not applied (or applied differently)


@dataclass
class Reading:
    """A client's reading of a whole file."""

    outcome: str = "loaded"  # loaded | rejected (an error: nothing applied) | ignored (whole file) | unsupported | unknown
    message: str = ""
    applications: list[Application] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    client: str
    label: str
    outcome: str
    message: str
    modules: int  # canonical modules the file changes
    applied: int  # of them, applied exactly
    ignored_keys: list[str]
    lost: dict[str, str]  # canonical module → why its effect is lost
    scales: dict[str, tuple[float, float]]  # canonical module → (the file's scale, the client's)
    misplaced: dict[str, str]  # file module → where the client applies it instead
    bias_lost: list[str]
    notes: list[str]

    @property
    def exact(self) -> bool:
        return (self.outcome == "loaded" and not self.lost and not self.scales and not self.misplaced
                and not self.bias_lost)

    def summary(self) -> str:
        """One line: the outcome and what differs."""
        if self.outcome != "loaded":
            return f"{self.outcome}: {self.message}"
        if self.exact:
            extra = f"; {len(self.ignored_keys)} keys unused" if self.ignored_keys else ""
            return f"exact: all {self.modules} modules applied at the file's scale{extra}"
        parts = []
        if self.lost:
            parts.append(f"{len(self.lost)} of {self.modules} modules lost")
        if self.scales:
            parts.append(f"{len(self.scales)} at another scale")
        if self.misplaced:
            parts.append(f"{len(self.misplaced)} file modules applied elsewhere")
        if self.bias_lost:
            parts.append(f"{len(self.bias_lost)} bias deltas lost")
        if self.ignored_keys:
            parts.append(f"{len(self.ignored_keys)} keys ignored")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "client": self.client, "label": self.label, "exact": self.exact, "outcome": self.outcome,
            "message": self.message, "modules": self.modules, "applied": self.applied,
            "ignored_keys": self.ignored_keys, "lost": self.lost,
            "scales": {k: {"file": a, "client": b} for k, (a, b) in self.scales.items()},
            "misplaced": self.misplaced, "bias_lost": self.bias_lost, "notes": self.notes,
        }


def same_place(app: Application) -> bool:
    m, t = app.module, app.target
    return (t is not None and app.component == m.component and t.members == m.target.members
            and tuple(t.ratios) == tuple(m.target.ratios) and bool(t.swap_halves) == bool(m.target.swap_halves))


def judge(name: str, label: str, file: FileView, reading: Reading) -> Verdict:
    canonical = [c for m in file.modules for c in m.modules]
    lost: dict[str, str] = {}
    scales: dict[str, tuple[float, float]] = {}
    misplaced: dict[str, str] = {}
    bias_lost: list[str] = []
    used: set[str] = set()
    if reading.outcome != "loaded":
        lost = {c: reading.outcome for c in canonical}
    else:
        for app in reading.applications:
            m = app.module
            used.update(app.used)
            if app.target is None:
                lost.update({c: app.why or "not applied" for c in m.modules})
            elif not same_place(app):
                where = f"{app.component}.{'+'.join(app.target.members)}"
                misplaced[m.prefix] = where + (f" ({app.why})" if app.why else "")
                lost.update({c: f"applied to {where}" for c in m.modules})
            else:
                if not math.isclose(app.scale, m.scale, rel_tol=REL_TOL):
                    scales.update({c: (m.scale, app.scale) for c in m.modules})
                if m.has_bias and not app.bias:
                    bias_lost.extend(m.modules)
    ignored = [k for k in file.keys if k not in used]
    applied = len(canonical) - len(lost) - len(scales)
    return Verdict(name, label, reading.outcome, reading.message, len(canonical), max(applied, 0), ignored, lost,
                   scales, misplaced, bias_lost, list(reading.notes))


# --------------------------------------------------------------------------------------------
# the clients


# module kinds whose loading check restates; IA3, OFT/BOFT, GLoRA and LyCORIS norm modules are not
MODELLED_KINDS = frozenset({"lora", "loha", "lokr", "full"})


class Client:
    """Base: a client reads a :class:`FileView` with the architecture's facts for it.
    ``read_from``: the source and version its rules were restated from."""

    def __init__(self, name: str, label: str, read_from: str):
        self.name, self.label, self.read_from = name, label, read_from

    def facts(self, arch: Architecture) -> ClientFacts | None:
        return arch.clients.get(self.name)

    def read(self, file: FileView) -> Reading:
        facts = self.facts(file.arch)
        if facts is None:
            return Reading("unknown", f"no {self.label} facts are recorded for {file.arch.label} "
                                      f"(add them to its architecture entry)")
        if facts.loader is None:
            return Reading("unsupported", f"{self.label} has no LoRA loader for {file.arch.label}; nothing is applied")
        unmodelled = sorted({m.kind for m in file.modules} - MODELLED_KINDS)
        if unmodelled:
            return Reading("unknown", f"how {self.label} applies {', '.join(unmodelled)} modules is not modelled")
        return self.load(file, facts)

    def load(self, file: FileView, facts: ClientFacts) -> Reading:
        raise NotImplementedError


def client(name: str) -> Client:
    if name not in CLIENTS:
        raise UsageError(f"unknown client {name!r}; use {', '.join(CLIENTS)} or all")
    return importlib.import_module(f"{__name__}.{name}").CLIENT


def resolve_clients(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'all', None → every client; 'a,b' or a list → those, validated."""
    if names is None or names == "all" or names == ["all"]:
        return list(CLIENTS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        if n == "all":
            return list(CLIENTS)
        client(n)
        if n not in out:
            out.append(n)
    return out


@dataclass
class Report:
    file: str
    arch: str
    format: str
    verdicts: list[Verdict]

    @property
    def exact(self) -> bool:
        return all(v.exact for v in self.verdicts)

    def verdict(self, name: str) -> Verdict:
        return next(v for v in self.verdicts if v.client == name)

    def as_dict(self) -> dict:
        return {"file": self.file, "architecture": self.arch, "format": self.format, "exact": self.exact,
                "clients": {v.client: v.as_dict() for v in self.verdicts}}


def check_view(file: FileView, clients=None) -> Report:
    verdicts = []
    for name in resolve_clients(clients):
        c = client(name)
        verdicts.append(judge(name, c.label, file, c.read(file)))
    return Report(file.path, file.arch.name, _format_label(file), verdicts)


def check(source: TensorSource | str | os.PathLike, clients=None, arch: str | None = None) -> Report:
    """What each client will do with the LoRA in ``source`` (a path, or an in-memory source)."""
    return check_view(view(source, arch), clients)


def _format_label(file: FileView) -> str:
    from collections import Counter

    if any(m.kind != "lora" or "mid" in m.keys for m in file.modules):
        return "lycoris"
    return Counter(m.label for m in file.modules).most_common(1)[0][0]


def format_report(report: Report, details: int = 8) -> str:
    """Human-readable text: one line per client, then up to ``details`` items of what differs."""
    lines = [f"{report.file}: {report.arch}, {report.format} format"]
    for v in report.verdicts:
        mark = "✓" if v.exact else "✗"
        lines.append(f"{mark} {v.label:<10} {v.summary()}")
        items = []
        items += [f"lost: {k} ({why})" for k, why in v.lost.items()] if v.outcome == "loaded" else []
        items += [f"scale: {k} file {a:.6g}, {v.label} {b:.6g}" for k, (a, b) in v.scales.items()]
        items += [f"applied elsewhere: {k} → {w}" for k, w in v.misplaced.items()]
        items += [f"bias delta lost: {k}" for k in v.bias_lost]
        items += [f"key not used: {k}" for k in v.ignored_keys] if v.outcome == "loaded" else []
        for item in items[:details]:
            lines.append(f"      {item}")
        if len(items) > details:
            lines.append(f"      … and {len(items) - details} more (--json lists all)")
        for note in v.notes:
            lines.append(f"      note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers the client modules share


def lookup(arch: Architecture, namings: list[tuple[str, "archs.Naming"]], prefix: str,
           exact: bool = True) -> list[tuple[str, Target]]:
    """Every (component, target) a key prefix names under the given (component, naming) pairs,
    spelled literally (no aliases: a client compares strings). Names are those of the full-size
    models; with ``exact`` False also names beyond them up to layer numbers (a file made for a
    larger model than the tables: the client's model then has those modules)."""
    from ..formats.placement import name_index

    found = []
    for component, naming in namings:
        if not prefix.startswith(naming.prefix) or len(prefix) == len(naming.prefix):
            continue
        rest = prefix[len(naming.prefix):]
        index = name_index(arch, component, naming)
        names = index.unflatten(rest) if naming.flat else [rest]
        names = [n for n in names if index.dotted(n) or (not exact and index.dotted(n) is not None)]
        for name in names:
            target = naming.scheme.decode(name)
            if target is not None:
                found.append((component, target))
    return found


def pick(found: list[tuple[str, Target]], module: FileModule) -> tuple[str, Target] | None:
    """The reading a client gets for a name several modules flatten to: ours when it is among
    them (the client's table then holds the same module under that string), else the first."""
    for component, target in found:
        if component == module.component and target == module.target:
            return component, target
    return found[0] if found else None


def native_scheme(arch: Architecture, component: str):
    """The scheme of the component's own checkpoint names (what ComfyUI, Forge and A1111 patch)."""
    comp = arch.component(component)
    return comp.single_file[0].scheme if comp is not None and comp.single_file else None


def fix_file(path, clients, output, arch: str | None = None, dtype=None) -> tuple[str, Report]:
    """Rewrite a LoRA in the first format (the architecture's default first) that every chosen
    client loads exactly; refuse, naming what each format loses where, when none does."""
    from pathlib import Path

    from ..errors import LoraMergeError
    from ..formats.safetensors_io import save_file
    from ..formats.sources import DictSource
    from ..formats import read_lora
    from ..formats.write import encode, resolve_dtype

    lora = read_lora(path, arch=arch)
    spec = archs.spec(lora.arch)
    dtype = resolve_dtype(dtype) or lora.dtype
    names = resolve_clients(clients)
    failures = []
    for fmt in [spec.default_format, *(f for f in spec.formats if f != spec.default_format)]:
        tensors, header = encode(lora, spec, fmt, dtype)
        report = check(DictSource(Path(output), tensors, header), names, arch=lora.arch)
        if report.exact:
            save_file(output, tensors, header)
            return fmt, report
        failures.append(f"{fmt}: " + ", ".join(f"{v.label} {v.summary()}" for v in report.verdicts if not v.exact))
    raise LoraMergeError(f"no {spec.label} format loramerge writes loads exactly in "
                         f"{' and '.join(client(n).label for n in names)} ({'; '.join(failures)})", path)


def write_warning(lora, arch: Architecture, format: str, dtype, tensors: dict, header: dict,
                   path) -> str | None:
    """One line naming each client that would not load these tensors exactly (clients without a
    loader for the architecture aside), what differs, and a format that loads there."""
    from pathlib import Path

    from ..errors import LoraMergeError
    from ..formats.sources import DictSource
    from ..formats.write import encode

    def report(fmt, t, h):
        return check(DictSource(Path(path), t, h), arch=arch.name)

    verdicts = [v for v in report(format, tensors, header).verdicts
                if not v.exact and v.outcome not in ("unsupported", "unknown")]
    if not verdicts:
        return None
    others = {}
    for other in arch.formats:
        if other != format:
            try:
                others[other] = report(other, *encode(lora, arch, other, dtype))
            except LoraMergeError:  # a format that cannot hold these modules (Wan's transformer_2 in kohya)
                continue
    parts = []
    for v in verdicts:
        fixes = [f for f, r in others.items() if r.verdict(v.client).exact]
        fix = f"--format {fixes[0]} loads exactly there" if fixes else "no format loramerge writes loads it exactly there"
        parts.append(f"{v.label}: {v.summary()} ({fix})")
    return f"{Path(path).name} in {format} format: " + "; ".join(parts)
