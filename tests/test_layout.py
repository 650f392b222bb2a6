"""The package's layout as docs/architecture.md states it, and the layering of its imports, read from the source
files alone (nothing is imported or computed).

Import graph: one node per module file of `sleeplm` (a package is its `__init__.py`); an edge for every `import` and
`from ... import` anywhere in a file (inside functions too). `from sleeplm.x import y` is an edge to `sleeplm.x.y`
when that is a module, else to `sleeplm.x` (a dotted name that is no module stands for its longest prefix that
is). Edges into the top-level package `sleeplm` (whose `__init__.py` re-exports the public API) and to other
top-level packages (`pallas_kernels`, third-party) are left out.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sleeplm"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def has_code(path: Path) -> bool:
    """Whether a file holds more than its module docstring."""
    body = ast.parse(path.read_text(), filename=str(path)).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def documented_files(package: Path = PACKAGE) -> set[str]:
    """The package's .py files that the layout table lists, relative to the package directory: every module, and
    every `__init__.py` that holds more than a docstring."""
    return {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if path.name != "__init__.py" or has_code(path)
    }


def layout_rows(text: str) -> list[str]:
    """The first cell of each body row of the table in the "## Layout" section of a markdown text, stripped of
    surrounding backticks and spaces."""
    match = re.search(r"^## Layout[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, 'docs/architecture.md has no "## Layout" section'
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip().startswith("|")]
    assert len(lines) >= 2, 'the "## Layout" section of docs/architecture.md has no table'
    body = [line for line in lines[1:] if not re.fullmatch(r"\|[\s:|-]+\|?", line)]
    return [line.strip("|").split("|")[0].strip().strip("`").strip() for line in body]


def layout_problems(rows: list[str], files: set[str]) -> list[str]:
    """What is wrong with a layout table's rows against the package's files: missing, extra and repeated rows."""
    problems = []
    missing = sorted(files - set(rows))
    extra = sorted(set(rows) - files)
    repeated = sorted({row for row in rows if rows.count(row) > 1})
    if missing:
        problems.append(f"modules with no row: {missing}")
    if extra:
        problems.append(f"rows naming no module of the package (or an __init__.py with no code): {extra}")
    if repeated:
        problems.append(f"modules with more than one row: {repeated}")
    return problems


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package's name is its __init__.py's)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules a module's source imports, anywhere in it, resolved as the module docstring says."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else resolve(source))
    top = name.partition(".")[0]
    return {target for target in found if target is not None and target != top}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    names = module_names(package)
    modules = set(names)
    return {
        name: imported_modules(ast.parse(path.read_text(), filename=str(path)), name, path.stem == "__init__", modules)
        for name, path in names.items()
    }


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def shortest_path(graph: dict[str, set[str]], start: str, goal, allowed=None) -> list[str] | None:
    """The shortest chain of imports from `start` to a module for which `goal(module)` holds (not `start` itself
    unless it is reached again), through `allowed` modules only when given."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = set()
    while queue:
        node = queue.popleft()
        for successor in sorted(graph.get(node, ())):
            if allowed is not None and successor not in allowed:
                continue
            if goal(successor):
                path = [successor, node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            if successor not in seen:
                seen.add(successor)
                previous[successor] = node
                queue.append(successor)
    return None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component of more than one module, and
    one per module that imports itself."""
    cycles = []
    for component in strongly_connected_components(graph):
        start = component[0]
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(shortest_path(graph, start, lambda m, s=start: m == s, allowed=set(component)))
    return cycles


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_chains(graph: dict[str, set[str]], importer: str, forbidden: str) -> list[list[str]]:
    """For each module of package `importer` whose imports reach a module of package `forbidden`, directly or
    through others, the shortest such chain."""
    chains = []
    for module in sorted(graph):
        if in_package(module, importer):
            chain = shortest_path(graph, module, lambda m: in_package(m, forbidden))
            if chain:
                chains.append(chain)
    return chains


def test_the_layout_table_lists_every_module():
    rows = layout_rows(ARCHITECTURE.read_text())
    problems = layout_problems(rows, documented_files())
    assert not problems, "docs/architecture.md's layout table does not match sleeplm/:\n" + "\n".join(problems)


def test_no_import_cycles_among_package_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles among sleeplm's modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_inference_imports_nothing_from_training():
    graph = import_graph()
    for package in ("sleeplm.inference", "sleeplm.experiment", "sleeplm.training"):
        assert any(in_package(module, package) for module in graph), f"{package} has no modules"
    chains = [
        chain
        for importer in ("sleeplm.inference", "sleeplm.experiment")
        for chain in forbidden_chains(graph, importer, "sleeplm.training")
    ]
    assert not chains, "modules that import training, directly or through others:\n" + "\n".join(
        " -> ".join(chain) for chain in chains
    )


def test_the_checks_catch_what_they_are_for():
    """The helpers above find a missing, an extra and a repeated row, a cycle, a self-import and a forbidden chain
    on small made-up inputs, so a passing run above is not a parser that sees nothing."""
    assert layout_problems(["a.py", "b.py", "b.py", "x.py"], {"a.py", "b.py", "c.py"}) == [
        "modules with no row: ['c.py']",
        "rows naming no module of the package (or an __init__.py with no code): ['x.py']",
        "modules with more than one row: ['b.py']",
    ]
    table = "## Layout\n\n| Module | What |\n|---|---|\n| `a.py` | A |\n| `b/c.py` | C |\n\n## Next\n| `z.py` | Z |\n"
    assert layout_rows(table) == ["a.py", "b/c.py"]
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.d"}, "p.e": {"p.a"}}
    assert sorted(import_cycles(graph)) == [["p.a", "p.b", "p.c", "p.a"], ["p.d", "p.d"]]
    assert forbidden_chains({"i.x": {"m"}, "m": {"t.y"}, "t.y": set()}, "i", "t") == [["i.x", "m", "t.y"]]
    modules = {"s.a", "s.a.b", "s.c", "s"}
    tree = ast.parse("def f():\n    from s.a import b, thing\n    import s.c.missing\n    from s import VERSION")
    assert imported_modules(tree, "s.z", False, modules) == {"s.a.b", "s.a", "s.c"}
    relative = ast.parse("from . import b\nfrom .. import c\nfrom .b import x")
    assert imported_modules(relative, "s.a.y", False, modules) == {"s.a.b", "s.c"}
    assert imported_modules(relative, "s.a", True, modules) == {"s.a.b", "s.c"}
