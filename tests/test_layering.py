"""The import structure of ``recipe`` and ``callbacks``, read from the source with ``ast``.

* no import cycles between modules (imports inside functions count: they are cycles too,
  only deferred to run time);
* ``recipe/config.py`` is a leaf: from the recipe it imports ``recipe.errors`` alone;
* no module imports another module's private (``_name``) names;
* only ``recipe/lightning_compat.py`` touches Lightning's private names.

``python tests/test_layering.py`` prints the import graph's cycles and the private names found.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("recipe", "callbacks")
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric")

# Import cycles that are known and not fixed yet: one frozenset of module names per cycle,
# with a comment naming the edge to cut. Empty: the package has none.
ALLOWED_CYCLES: set[frozenset[str]] = set()

# Lightning private names still used outside recipe/lightning_compat.py: file -> names, each
# with a comment saying why it cannot go through a wrapper yet. Empty: none is.
LIGHTNING_PRIVATE_ALLOWED: dict[str, set[str]] = {}
COMPAT = "recipe/lightning_compat.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# ---------------------------------------------------------------------------- the import graph


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), filename=str(modules()[name]))


def _base(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _owner(dotted: str) -> str | None:
    """The module of ours that defines ``dotted`` (a module, or a name in one)."""
    while dotted and dotted not in modules():
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports(name: str) -> list[tuple[str, str, int, str]]:
    """``(imported module, imported name or "", line, source line)`` of every import of one of our
    modules in ``name``, at any depth (functions, ``if TYPE_CHECKING``)."""
    found = []
    lines = modules()[name].read_text().splitlines()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES and _owner(alias.name):
                    found.append((_owner(alias.name), "", node.lineno, lines[node.lineno - 1].strip()))
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, node)
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules():  # ``from recipe.data import build``: the module itself
                    found.append((full, "", node.lineno, lines[node.lineno - 1].strip()))
                elif _owner(base):
                    found.append((_owner(base), alias.name, node.lineno, lines[node.lineno - 1].strip()))
    return found


@cache
def graph() -> dict[str, dict[str, tuple[int, str]]]:
    """module -> {imported module: (line, source line) of its first import there}."""
    edges: dict[str, dict[str, tuple[int, str]]] = {}
    for name in modules():
        out = edges.setdefault(name, {})
        for target, _, line, source in sorted(imports(name), key=lambda item: item[2]):
            if target != name:
                out.setdefault(target, (line, source))
    return edges


def cycles() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    edges, index, low, stack, on_stack, found = graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def describe(component: set[str]) -> str:
    edges = graph()
    lines = [f"cycle of {len(component)} modules: {', '.join(sorted(component))}"]
    for a in sorted(component):
        for b, (line, source) in sorted(edges[a].items()):
            if b in component:
                lines.append(f"  {a} -> {b}   {modules()[a].relative_to(REPO)}:{line}: {source}")
    return "\n".join(lines)


def test_no_import_cycles():
    found = [c for c in cycles() if frozenset(c) not in ALLOWED_CYCLES]
    assert not found, "import cycles (cut one edge of each):\n" + "\n".join(describe(c) for c in found)


def test_the_graph_sees_function_level_imports():
    # recipe.cli dispatches to the subcommands from inside main(): those edges must be in the graph.
    assert {"recipe.interop.cli", "recipe.planner", "recipe.data.cli"} <= set(graph()["recipe.cli"])


def test_config_is_a_leaf():
    recipe_imports = {target for target, _, _, _ in imports("recipe.config")}
    assert recipe_imports <= {"recipe.errors"}, recipe_imports


# ---------------------------------------------------------------------------- private names


def private_imports() -> list[str]:
    """``from recipe.x import _name`` (or ``x._name`` on an imported module of ours) across modules."""
    found = []
    for name, path in modules().items():
        where = path.relative_to(REPO)
        module_aliases: set[str] = set()
        for target, imported, line, source in imports(name):
            if imported and _private(imported) and target != name:
                found.append(f"{where}:{line}: {source}")
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.Import):
                module_aliases |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] in PACKAGES}
            elif isinstance(node, ast.ImportFrom) and _base(name, node).split(".")[0] in PACKAGES:
                base = _base(name, node)
                module_aliases |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" in modules()}
        for node in ast.walk(tree(name)):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_names_across_modules():
    found = private_imports()
    assert not found, "private names used outside their module (make them public):\n" + "\n".join(found)


@cache
def lightning_private_names() -> frozenset[str]:
    """Every private name the installed Lightning defines: functions, classes, attributes, constants."""
    import lightning

    names = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        try:
            module = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(module):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            else:
                continue
            if _private(name):
                names.add(name)
    return frozenset(names)


@cache
def own_private_names() -> frozenset[str]:
    """Private names our own code defines: functions, classes, class attributes, and attributes
    that a class sets up in its ``__init__`` (its own state, not a base class's)."""
    names = set()
    for name in modules():
        for node in ast.walk(tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                body = node.body
                if isinstance(node, ast.ClassDef):
                    names |= {t.id for stmt in body if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                              for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                              if isinstance(t, ast.Name)}
                if node.name == "__init__":
                    names |= {t.attr for t in ast.walk(node) if isinstance(t, ast.Attribute)
                              and isinstance(t.ctx, ast.Store) and isinstance(t.value, ast.Name)
                              and t.value.id == "self"}
    return frozenset(n for n in names if _private(n))


def lightning_private_uses(name: str) -> list[tuple[int, str, str]]:
    """``(line, private name, code)`` of each touch of a private Lightning name in module ``name``."""
    lightning_names = lightning_private_names() - own_private_names()
    found = []
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIGHTNING_PACKAGES:
            for alias in node.names:
                if _private(alias.name) or any(_private(p) for p in node.module.split(".")):
                    found.append((node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIGHTNING_PACKAGES and any(_private(p) for p in parts):
                    found.append((node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.Attribute) and node.attr in lightning_names:
            found.append((node.lineno, node.attr, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in lightning_names):
            found.append((node.lineno, node.args[1].value, ast.unparse(node)))
    return found


def test_lightning_private_names_only_in_the_compat_module():
    found = []
    for name, path in modules().items():
        where = str(path.relative_to(REPO))
        if where == COMPAT:
            continue
        allowed = LIGHTNING_PRIVATE_ALLOWED.get(where, set())
        found += [f"{where}:{line}: {code}" for line, private, code in lightning_private_uses(name)
                  if private not in allowed]
    assert not found, ("private Lightning names outside recipe/lightning_compat.py (use a public API, or add a "
                       "wrapper there):\n" + "\n".join(found))


def test_the_compat_module_names_the_version_it_was_checked_against():
    import recipe.lightning_compat as compat

    assert compat.LIGHTNING_VERSION_CHECKED in compat.__doc__
    for name in compat.__all__:
        assert name == "LIGHTNING_VERSION_CHECKED" or getattr(compat, name).__doc__, f"{name} lacks a docstring"


if __name__ == "__main__":
    print(f"{len(modules())} modules, {sum(len(e) for e in graph().values())} import edges")
    for component in cycles():
        print(describe(component))
    if not cycles():
        print("no import cycles")
    for line in private_imports():
        print("private import:", line)
    for name, path in modules().items():
        for line, private, code in lightning_private_uses(name):
            print(f"lightning private: {path.relative_to(REPO)}:{line}: {code}")
