"""The layer order of docs/architecture.md, checked over estimator/'s imports (ast, no import).

Every import counts, at module level or inside a function (a lazy import is still a dependency),
except those under `if TYPE_CHECKING:` (annotations only). A module may import its own package
and any package of a lower or equal layer; equal layers may not import each other in a circle.
ruff's TID253 (pyproject.toml) keeps torch and numpy out of module level outside their zones;
this test keeps the order between the packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "estimator"

LAYERS: list[set[str]] = [
    {"units", "errors", "inputs", "outputs", "allocator", "children"},  # ground floor: stdlib only
    {"specs"},                                  # pydantic models
    {"catalog"},                                # data/ → specs
    {"analytic"},                               # the model: pure functions
    {"checks", "request", "arguments"},         # one setup check; flags → TrainSetup
    {"hardware"},                               # this machine → Device, profile store
    {"planner", "planfile"},                    # estimate + advice, search, compare, plan files
    {"validation_suites", "validation"},        # the validate workflow
    {"report"},                                 # formatting and rich tables
    {"trace", "executor"},                      # TORCH: fake-tensor traces, the trainer
    {"calibrate"},                              # TORCH: times the executor's kernels
    {"api"},                                    # the entry points (plan may calibrate)
    {"cli"},                                    # typer: parse → library → report
    {"__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
TORCH_ZONE = {"calibrate", "executor", "trace"}
PURE = {"units", "errors", "specs", "catalog", "analytic", "checks", "request", "planner"}
"""No printing, no torch, no rich, no typer: the library a notebook imports."""
ALLOWED_CLIMBS = {
    ("estimator/specs/model.py", "estimator.analytic.params"):
        "ModelSpec.num_params reads the one parameter formula, imported when the property is read",
}
"""(file, module) → why: the only imports allowed to climb, each lazy and documented."""
FORBIDDEN_THIRD_PARTY = {"torch", "rich", "typer", "matplotlib", "transformers", "peft"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                out.update(id(n) for n in ast.walk(child))
    return out


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_blocks(tree)
    top = {id(n) for n in tree.body}
    for node in tree.body:  # module-level try/if blocks count as module level
        if isinstance(node, (ast.Try, ast.If)):
            top.update(id(n) for n in ast.walk(node))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "estimator":  # `from estimator import catalog` names a unit
                out += [(f"estimator.{a.name}", node.lineno, id(node) in top)
                        for a in node.names]
            else:
                out.append((module, node.lineno, id(node) in top))
    return out


def _unit(module: str) -> str:
    """The package or top-level module of estimator/ that `module` is in; '__init__' for the
    package root and the names it defines (__version__)."""
    parts = module.split(".")
    if len(parts) > 1 and ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists()):
        return parts[1]
    return "__init__"


FILES = sorted(ROOT.rglob("*.py"))
EDGES = [(_unit(_module_name(p)), _unit(m), f"{p.relative_to(ROOT.parent)}:{line}", top, m)
         for p in FILES for m, line, top in _imports(p)]


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(p)) for p in FILES} - {"__init__"}
    assert units <= set(LAYER), f"add to LAYERS (and docs/architecture.md): {units - set(LAYER)}"


def test_no_import_climbs_a_layer() -> None:
    bad = [f"{where}: {src} (layer {LAYER[src]}) imports {module} (layer {LAYER[dst]})"
           for src, dst, where, _, module in EDGES
           if module.startswith("estimator.") and src != "__init__" and dst != "__init__"
           and src != dst and LAYER[dst] > LAYER[src]
           and (where.split(":")[0], module) not in ALLOWED_CLIMBS]
    assert not bad, "\n".join(bad)


def test_allowed_climbs_are_lazy() -> None:
    for _, _, where, top, module in EDGES:
        if (where.split(":")[0], module) in ALLOWED_CLIMBS:
            assert not top, f"{where}: import {module} inside the function that needs it"


def test_only_the_version_from_the_package_root() -> None:
    """`estimator/__init__` is the lazy public facade: inside the package, import the module
    that defines a name, not the facade (only __version__ lives there)."""
    bad = [where for src, dst, where, _, module in EDGES
           if dst == "__init__" and module != "estimator.__version__" and src != "__init__"
           and module.startswith("estimator")]
    assert not bad, bad


def test_nothing_imports_the_cli() -> None:
    bad = [where for src, dst, where, _, _ in EDGES
           if dst == "cli" and src not in ("cli", "__main__")]
    assert not bad, bad


@pytest.mark.parametrize("higher", ["planner", "api", "hardware", "executor", "calibrate",
                                    "trace", "cli", "report"])
def test_analytic_stays_below(higher: str) -> None:
    bad = [where for src, dst, where, _, _ in EDGES if src == "analytic" and dst == higher]
    assert not bad, bad


def test_no_circle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, where, _, module in EDGES:
        if (module.startswith("estimator") and src != dst and "__init__" not in (src, dst)
                and (where.split(":")[0], module) not in ALLOWED_CLIMBS):
            graph[src].add(dst)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " → ".join([*path[path.index(node):],
                                                                  node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_torch_only_in_the_torch_zone_at_module_level() -> None:
    """The same rule as ruff's TID253, so that the test suite alone catches it too."""
    bad = [where for src, _, where, top, module in EDGES
           if top and module.split(".")[0] == "torch" and src not in TORCH_ZONE]
    assert not bad, bad


def test_pure_core_imports_no_frontend_or_torch() -> None:
    bad = [f"{where}: {module}" for src, _, where, _, module in EDGES
           if src in PURE and module.split(".")[0] in FORBIDDEN_THIRD_PARTY]
    assert not bad, bad
