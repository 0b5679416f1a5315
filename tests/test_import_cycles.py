"""No import cycles in the repository's Python packages, function-level imports included.

Every ``.py`` file under ``mind/`` and ``mind_kernels/`` is parsed with :mod:`ast` (nothing is
imported) and the module import graph is built from every import statement, wherever it sits: at
the top level, inside functions and methods, under ``if``/``try`` (``if TYPE_CHECKING:`` too), plus
``importlib.import_module("literal")`` calls.  A deferred import inside a function still ties the
two modules together and only hides a cycle until the function runs first, so it counts.

Edges, for a statement in module ``m`` (relative imports resolved against ``m``'s package; for
``pkg/__init__.py`` the package is ``pkg`` itself):

* ``import a.b.c`` (with or without ``as``) is an edge to ``a.b.c`` only.
* ``from A import n`` (``A`` absolute, or relative: ``from . import n``, ``from .x import n``) is an
  edge to ``A.n`` when ``A.n`` is a module (a ``.py`` file or a package here, or a submodule without
  Python source such as a compiled extension: a name that ``A/__init__.py`` never binds), and to
  ``A`` otherwise.  So ``from . import x`` and ``from .x import y`` / ``from pkg.x import y`` are edges
  to ``pkg.x`` only, and ``from pkg import name`` (a name that ``pkg/__init__.py`` defines or
  re-exports) is an edge to ``pkg``, i.e. to ``pkg/__init__.py``.
* A module's own package ``__init__`` is never an implicit edge.  Python does run ``pkg/__init__.py``
  before any ``pkg.x``, but that holds for every submodule alike; counting it would make every
  ``__init__`` that imports its submodules a cycle.  So ``pkg/__init__.py`` importing its
  submodules, and submodules importing *siblings* directly (``from .sibling import f``), form no
  cycle; a submodule reaching a sibling's name *through the package* (``from pkg import f`` or
  ``from . import f`` where ``f`` is re-exported by ``pkg/__init__.py``) does, whenever the
  ``__init__`` imports that submodule (directly or not): import from the defining module instead.
* Only edges between modules of these packages are kept (torch, numpy, ... are leaves), and a
  module importing itself is not an edge.

The graph holds both packages at once (a cycle through both would show in both halves); each
package's half asserts that none of its modules sits on a cycle and reports one cycle found,
each step with the file and line of the import.
"""

from __future__ import annotations

import ast
import os
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mind_kernels", "mind")

Edge = Tuple[str, str, int]  # (target module, file, line)


def discover(root: Path, packages) -> Dict[str, Path]:
    """Dotted module name -> source file, for every .py file under each package directory."""
    modules: Dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _bound_names(tree: ast.Module) -> Optional[Set[str]]:
    """Names a module binds at its top level (None: unknowable, e.g. a star import or ``__getattr__``)."""
    names: Set[str] = set()

    def targets(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":
                        raise LookupError
                    names.add(alias.asname or alias.name)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    try:
        visit(tree.body)
    except LookupError:
        return None
    return None if "__getattr__" in names else names


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, path: Path, name: Optional[str], level: int) -> Optional[str]:
    """The absolute name of ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        return name
    parts = _package_of(module, path).split(".")
    if level - 1 > len(parts) - 1:
        return None  # beyond the top-level package: not ours
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def build_graph(root: Path, packages) -> Tuple[Dict[str, Path], Dict[str, List[Edge]]]:
    """(modules, edges): module -> [(imported module, file, line)] over every import in the packages."""
    modules = discover(root, packages)
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in modules.items()}
    bound = {m: _bound_names(t) for m, t in trees.items() if modules[m].name == "__init__.py"}

    def is_submodule(parent: str, name: str) -> bool:
        full = f"{parent}.{name}"
        if full in modules:
            return True
        if parent in bound:  # one of our packages: a name its __init__ never binds must be a submodule
            names = bound[parent]
            return names is not None and name not in names
        return False

    graph: Dict[str, List[Edge]] = {m: [] for m in modules}
    for module, tree in trees.items():
        path = modules[module]
        rel = os.path.relpath(path, root)

        def add(target: Optional[str], line: int) -> None:
            if target and target in modules and target != module:
                graph[module].append((target, rel, line))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node.module, node.level)
                if source is None:
                    continue
                for alias in node.names:
                    if alias.name != "*" and is_submodule(source, alias.name):
                        add(f"{source}.{alias.name}", node.lineno)
                    else:
                        add(source, node.lineno)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("import_module", "__import__"):
                    name = node.args[0].value
                    level = len(name) - len(name.lstrip("."))
                    add(_resolve(module, path, name[level:] or None, level), node.lineno)
    return modules, graph


def _strongly_connected(graph: Dict[str, List[Edge]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative), in a stable order."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({t for t, _, _ in graph[start]})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _, _ in graph[child]}))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    components.append(sorted(component))
    return components


def find_cycles(graph: Dict[str, List[Edge]]) -> List[List[Edge]]:
    """One shortest cycle per strongly connected component with more than one module, as edges
    [(next module, file, line), ...] starting from the component's first module."""
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        start = component[0]
        previous: Dict[str, Tuple[str, Edge]] = {}
        queue = deque([start])
        while queue:  # breadth first back to ``start`` inside the component
            node = queue.popleft()
            for edge in graph[node]:
                target = edge[0]
                if target not in members or target in previous:
                    continue
                previous[target] = (node, edge)
                if target == start:
                    queue.clear()
                    break
                queue.append(target)
        path: List[Edge] = []
        node = start
        while True:
            parent, edge = previous[node]
            path.append((node, edge[1], edge[2]))
            node = parent
            if node == start:
                break
        cycles.append(list(reversed(path)))
    return cycles


def format_cycle(cycle: List[Edge]) -> str:
    """``a -> b (a.py:3) -> a (b.py:10)``: each step names the import that makes it."""
    first = cycle[-1][0]
    return first + "".join(f"\n    -> {target}  ({file}:{line})" for target, file, line in cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    modules, graph = build_graph(ROOT, PACKAGES)
    assert any(m == package or m.startswith(package + ".") for m in modules), f"no modules found under {package}/"
    ours = [c for c in find_cycles(graph) if any(t == package or t.startswith(package + ".") for t, _, _ in c)]
    assert not ours, f"import cycles in {package}/ (function-level imports count; one cycle per tangle):\n" + "\n".join(
        format_cycle(c) for c in ours)


# ------------------------------------------------------------------- the checker on small made-up trees


def _tree(tmp_path: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def _cycles(tmp_path, files):
    root = _tree(tmp_path, files)
    return sorted(sorted({t for t, _, _ in c}) for c in find_cycles(build_graph(root, ("pkg",))[1]))


def test_checker_init_reexports_and_sibling_imports_are_no_cycle(tmp_path):
    assert _cycles(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom .b import g\nfrom . import c\n",
        "pkg/a.py": "from .b import g\nimport pkg.c\n",
        "pkg/b.py": "def g(): pass\n",
        "pkg/c.py": "from . import b\nfrom pkg.b import g\n",
        "pkg/d.py": "from pkg import _ext\n",  # a submodule without .py source (compiled): not the package
    }) == []


def test_checker_finds_a_name_taken_through_the_package(tmp_path):
    assert _cycles(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom .b import g\n",
        "pkg/a.py": "def f():\n    from . import g\n    return g\n",  # g is b's, re-exported by __init__
        "pkg/b.py": "def g(): pass\n",
    }) == [["pkg", "pkg.a"]]


def test_checker_finds_function_level_and_nested_package_cycles(tmp_path):
    assert _cycles(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.sub.b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def later():\n    from ..a import x\n",
        "pkg/c.py": "import importlib\nimportlib.import_module('pkg.d')\n",
        "pkg/d.py": "def f():\n    from .c import y\n",
    }) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
