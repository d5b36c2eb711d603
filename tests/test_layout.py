"""The package's shape: no import cycles, architectures known only from their entries, the tiny
world's apps outside the core."""

import ast
import pathlib

import loramerge
from loramerge.formats import archs

ROOT = pathlib.Path(loramerge.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = f
    return found


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Every loramerge module ``name`` imports at run time, at module level or inside functions; ``from . import x``
    of a submodule depends on the submodule, of a name on the package that defines it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)  # `if TYPE_CHECKING:` imports never run
                   if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                deps.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in modules and d != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_core_code_never_names_an_architecture():
    """read, write, checkpoint, blocks, report, runtime… dispatch on the entries: no string
    literal in them is an architecture's or a variant's name."""
    names = set(archs.names()) | {v for a in archs.registry().values() for v in a.variants}
    core = ["formats/read.py", "formats/write.py", "formats/checkpoint.py", "formats/detect.py", "formats/placement.py",
            "formats/blockgrammar.py", "blocks.py", "report.py", "runtime.py", "fuse.py", "merge.py", "io.py",
            "extract.py", "analysis.py", "composer.py", "cli.py"]
    for rel in core:
        tree = ast.parse((ROOT / rel).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & names, f"{rel} names architectures {sorted(literals & names)}"


def test_tiny_world_apps_live_with_the_tiny_world():
    assert not (ROOT / "composition.py").exists() and not (ROOT / "demo.py").exists()
    assert (ROOT / "tinyworld" / "composition.py").exists() and (ROOT / "tinyworld" / "demo.py").exists()


def test_readme_architecture_table_is_the_entries():
    """The README's table is what scripts/arch_table.py prints from the entries (regenerate it
    when an entry changes)."""
    import importlib.util

    script = ROOT.parents[1] / "scripts" / "arch_table.py"
    spec = importlib.util.spec_from_file_location("arch_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() in (ROOT.parents[1] / "README.md").read_text()
