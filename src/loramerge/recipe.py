"""Recipes: a merge written down as YAML a person can read, validated with errors that name the
line and the field, and embedded (resolved) in the file it produces.

    sources:
      - path: style.safetensors
        weight: 0.7
        block_weights: OUTALL          # A1111 vector / preset, diffusers dict, patterns
      - path: subject.safetensors
        weight: 0.8
    method: ties
    params: {density: 0.5}
    space: core                        # core or full, for the sparsifying methods
    rank: 32                           # or energy: 0.95
    seed: 0
    output: {path: merged.safetensors, format: kohya, dtype: fp16, title: style+subject}
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .composer import COMPOSE_METHODS, Composition, compose
from .errors import LoraMergeError, UsageError
from .formats.write import formats, resolve_dtype
from .methods import METHODS, get_method
from .outputs import inside, sha256_file
from .provenance import RECIPE_KEY, RecipeError, describe_embedded, embedded  # noqa: F401  (re-exported)

TOP_LEVEL = ("sources", "method", "params", "space", "rank", "energy", "seed", "block_weights",
             "output", "device", "arch", "compose")
# compose: the LoRAs are composed at inference time (loramerge.compose), not merged into a file
COMPOSE_FIELDS = ("method", "tau", "prompts", "triggers", "alpha", "beta", "pattern", "guidance_scale")
SOURCE_FIELDS = ("path", "weight", "block_weights", "sha256")
OUTPUT_FIELDS = ("path", "format", "dtype", "title")


def parse_source(spec: str) -> tuple[str, float]:
    """'a.safetensors:0.7' → ('a.safetensors', 0.7); no weight means 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


@dataclass
class Source:
    path: Path
    weight: float = 1.0
    block_weights: Any = None
    sha256: str | None = None  # when given, the file must still have these bytes


@dataclass
class Recipe:
    sources: list[Source]
    method: str = "linear"
    params: dict = field(default_factory=dict)
    rank: int | None = None
    energy: float | None = None
    seed: int = 0
    block_weights: Any = None
    output: Path | None = None
    format: str | None = None  # None: the architecture's default
    dtype: str | None = None
    title: str | None = None
    device: str | None = None
    arch: str | None = None  # read every source as this architecture
    path: Path | None = None
    compose: dict | None = None  # {method: switch|composite|klora|…, its parameters, guidance_scale}

    def merge_kwargs(self) -> dict:
        block_weights = [s.block_weights if s.block_weights is not None else self.block_weights for s in self.sources]
        return dict(
            weights=[s.weight for s in self.sources], method=self.method, rank=self.rank, energy=self.energy,
            seed=self.seed, device=self.device, dtype=self.dtype,
            block_weights=block_weights if any(b is not None for b in block_weights) else None,
            **self.params,
        )


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"a recipe is a short YAML file; this one has {path.stat().st_size} bytes", path)
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start}); a recipe is a YAML file", path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror or exc}", path) from None
    return parse_recipe(text, path)


MAX_RECIPE_BYTES = 1 << 20
# The tags plain YAML resolves to; anything else (!!python/object, !!binary, local !tags) is refused.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


def _check_tags(root, path) -> None:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise RecipeError(f"line {_line(node)}: the tag {node.tag!r} is not allowed in a recipe (plain YAML only)",
                              path)
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    base = path.parent if path else Path(".")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{where}not valid YAML ({getattr(exc, 'problem', exc)})", path) from None
    except RecursionError:
        raise RecipeError("not a recipe: YAML nested too deeply", path) from None
    if root is None:
        raise RecipeError("the recipe is empty (it needs sources:, and usually method: and output:)", path)
    _check_tags(root, path)
    v = _Validator(path)
    top = v.mapping(root, "recipe", TOP_LEVEL)
    if "sources" not in top:
        raise RecipeError(f"line {_line(root)}: sources: missing (list the LoRA files to merge)", path)
    recipe = Recipe(sources=v.sources(top["sources"], base), path=path)
    if "method" in top:
        recipe.method = v.method(top["method"])
    method = get_method(recipe.method)
    if "params" in top:
        recipe.params = v.params(top["params"], method)
    if "space" in top:
        if "space" not in {p.name for p in method.params}:
            raise RecipeError(f"line {_line(top['space'])}: space: method {method.name!r} has no space choice", path)
        recipe.params["space"] = v.scalar(top["space"], "space", str)
    try:
        recipe.params = {k: v_ for k, v_ in method.resolve_params(recipe.params).items() if k in recipe.params}
    except LoraMergeError as exc:
        node = top.get("params") or top.get("space") or root
        raise RecipeError(f"line {_line(node)}: params: {exc.message}", path) from None
    if "rank" in top:
        recipe.rank = v.scalar(top["rank"], "rank", int, low=1)
    if "energy" in top:
        recipe.energy = v.scalar(top["energy"], "energy", float, low=1e-9, high=1.0)
    if recipe.rank is not None and recipe.energy is not None:
        raise RecipeError(f"line {_line(top['energy'])}: energy: give rank or energy, not both", path)
    if (recipe.rank is not None or recipe.energy is not None) and not method.uses_rank:
        node = top.get("rank") or top.get("energy")
        raise RecipeError(f"line {_line(node)}: method {method.name!r} does not take a rank or energy", path)
    if "seed" in top:
        recipe.seed = v.scalar(top["seed"], "seed", int, low=0)
    if "block_weights" in top:
        recipe.block_weights = _plain(top["block_weights"], path)
    if "device" in top:
        recipe.device = v.scalar(top["device"], "device", str)
    if "arch" in top:
        recipe.arch = v.arch(top["arch"])
    if "output" in top:
        v.output(top["output"], recipe, base)
    if "compose" in top:
        recipe.compose = v.compose(top["compose"])
    return recipe


def _line(node) -> int:
    return node.start_mark.line + 1



def _plain(node, path=None) -> Any:
    """A YAML node as plain Python data (safe types only)."""
    try:
        return yaml.safe_load(yaml.serialize(node))
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise RecipeError(f"line {_line(node)}: cannot read this value ({type(exc).__name__})", path) from None


class _Validator:
    def __init__(self, path: Path | None):
        self.path = path

    def fail(self, node, where: str, problem: str):
        raise RecipeError(f"line {_line(node)}: {where}: {problem}", self.path)

    def mapping(self, node, where: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, "expected a mapping of field: value")
        fields = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, where, "field names are plain words")
            key = key_node.value
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                self.fail(key_node, f"{where}.{key}" if where != "recipe" else key,
                          "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields: {', '.join(allowed)}"))
            if key in fields:
                self.fail(key_node, key, "given twice")
            fields[key] = value_node
        return fields

    def scalar(self, node, where: str, kind: type, low=None, high=None):
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, where, f"expected a single {kind.__name__}")
        value = _plain(node, self.path)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and not isinstance(value, str):
            value = str(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            self.fail(node, where, f"expected a {kind.__name__}, got {node.value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(node, where, f"{value} is out of range")
        return value

    def arch(self, node) -> str:
        from .formats import archs

        name = self.scalar(node, "arch", str)
        try:
            archs.spec(name)
        except LoraMergeError as exc:
            self.fail(node, "arch", exc.message)
        return name

    def method(self, node) -> str:
        name = self.scalar(node, "method", str)
        if name not in METHODS:
            hint = difflib.get_close_matches(name, list(METHODS), n=1)
            self.fail(node, "method", f"unknown merge method {name!r}"
                      + (f" (did you mean {hint[0]!r}?)" if hint else f"; available: {', '.join(sorted(METHODS))}"))
        return name

    def params(self, node, method) -> dict:
        fields = self.mapping(node, "params", tuple(p.name for p in method.params) or ("(none)",))
        declared = {p.name: p for p in method.params}
        out = {}
        for name, value_node in fields.items():
            value = _plain(value_node, self.path)
            try:
                out[name] = declared[name].coerce(value)
            except LoraMergeError as exc:
                self.fail(value_node, f"params.{name}", exc.message)
        return out

    def sources(self, node, base: Path) -> list[Source]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, "sources", "expected a list of LoRA files")
        out = []
        for i, item in enumerate(node.value):
            where = f"sources[{i}]"
            if isinstance(item, yaml.ScalarNode):  # "file.safetensors:0.7"
                file, weight = parse_source(str(item.value))
                out.append(Source(self._file(item, where, file, base), weight))
                continue
            fields = self.mapping(item, where, SOURCE_FIELDS)
            if "path" not in fields:
                self.fail(item, where, "missing path")
            file = self._file(fields["path"], f"{where}.path", self.scalar(fields["path"], f"{where}.path", str), base)
            weight = self.scalar(fields["weight"], f"{where}.weight", float) if "weight" in fields else 1.0
            block_weights = _plain(fields["block_weights"], self.path) if "block_weights" in fields else None
            sha = self.scalar(fields["sha256"], f"{where}.sha256", str) if "sha256" in fields else None
            if sha is not None:
                self._same_bytes(fields["sha256"], f"{where}.sha256", file, sha)
            out.append(Source(file, weight, block_weights, sha))
        return out

    def _same_bytes(self, node, where: str, file: Path, sha: str) -> None:
        if file.is_file() and sha256_file(file) != sha.lower():
            self.fail(node, where, f"{file.name} has changed since the recipe was written (SHA-256 differs)")

    def _named(self, node, where: str, name: str) -> str:
        if not name or "\0" in name:
            self.fail(node, where, "expected a file name")
        return name

    def _file(self, node, where: str, name: str, base: Path) -> Path:
        self._named(node, where, name)
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.exists():
            self.fail(node, where, f"no such file {name!r}")
        return path

    def compose(self, node) -> dict:

        fields = self.mapping(node, "compose", COMPOSE_FIELDS)
        if "method" not in fields:
            self.fail(node, "compose", "missing method")
        out = {name: _plain(value) for name, value in fields.items()}
        if out["method"] not in COMPOSE_METHODS:
            self.fail(fields["method"], "compose.method", f"unknown composition method {out['method']!r}; "
                      f"available: {', '.join(COMPOSE_METHODS)}")
        return out

    def _output_path(self, node, where: str, base: Path) -> Path:
        """Relative to the recipe's folder and inside it (``../x`` is refused), or absolute."""
        name = self._named(node, where, self.scalar(node, where, str))
        if Path(name).is_absolute():
            return Path(name)
        target = base / name
        if not inside(target, base):
            self.fail(node, where, f"{name!r} lies outside the recipe's folder; give an absolute path to write there")
        return target

    def output(self, node, recipe: Recipe, base: Path) -> None:
        if isinstance(node, yaml.ScalarNode):
            recipe.output = self._output_path(node, "output", base)
            return
        fields = self.mapping(node, "output", OUTPUT_FIELDS)
        if "path" in fields:
            recipe.output = self._output_path(fields["path"], "output.path", base)
        if "format" in fields:
            fmt = self.scalar(fields["format"], "output.format", str)
            if fmt not in formats():
                self.fail(fields["format"], "output.format", f"unknown format {fmt!r}; use {' or '.join(formats())}")
            recipe.format = fmt
        if "dtype" in fields:
            recipe.dtype = self.scalar(fields["dtype"], "output.dtype", str)
            try:
                resolve_dtype(recipe.dtype)
            except LoraMergeError as exc:
                self.fail(fields["dtype"], "output.dtype", exc.message)
        if "title" in fields:
            recipe.title = self.scalar(fields["title"], "output.title", str)


# --------------------------------------------------------------------------------------------
# the recipe a merged file carries, back to YAML


def to_yaml(recipe: dict, near: Path | None = None) -> str:
    """A YAML recipe (the schema of :func:`parse_recipe`) from an embedded one. Source paths,
    recorded relative to the merged file ``near``, are written relative to the working directory."""
    sources = []
    for entry in recipe["sources"]:
        name = str(entry.get("path", "?"))
        beside = near.parent / name if near is not None else Path(name)
        path = os.path.relpath(beside) if near is not None else name
        item = {"path": path, "weight": entry.get("weight", 1.0)}
        for key in ("block_weights", "sha256"):
            if entry.get(key) is not None:
                item[key] = entry[key]
        sources.append(item)
    out: dict[str, Any] = {"sources": sources, "method": recipe["method"]}
    for key in ("params", "rank", "energy", "seed", "arch", "block_weights"):
        if recipe.get(key) not in (None, {}):
            out[key] = recipe[key]
    output = {k: v for k, v in (recipe.get("output") or {}).items() if v is not None}
    if output:
        out["output"] = output
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def compose_recipe(pipe, recipe) -> tuple[Composition, dict]:
    """Compose a recipe's sources as its ``compose:`` section says (a recipe file, or a Recipe);
    returns the handle and the generation settings to pass to ``pipe(...)`` (guidance_scale)."""
    plan = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if not plan.compose:
        raise UsageError("this recipe has no compose: section (merge it with loramerge merge --recipe)")
    settings = dict(plan.compose)
    method = settings.pop("method")
    generation = {"guidance_scale": settings.pop("guidance_scale")} if "guidance_scale" in settings else {}
    names = [f"{i}:{s.path.stem}" for i, s in enumerate(plan.sources)]
    blocks = {n: s.block_weights if s.block_weights is not None else plan.block_weights
              for n, s in zip(names, plan.sources)}
    handle = compose(pipe, {n: s.path for n, s in zip(names, plan.sources)}, method,
                     weights={n: s.weight for n, s in zip(names, plan.sources)},
                     block_weights={n: b for n, b in blocks.items() if b is not None} or None, **settings)
    return handle, generation
