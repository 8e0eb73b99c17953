"""The package's import graph: no cycles, every import resolves, and each room of ``workbench.rpc`` imports
only the rooms below it (docs/architecture.md).

Imports are read from the source with ``ast``, including those inside functions (they run later, but they
are dependencies all the same); imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# who may import whom inside workbench.rpc (each room may import itself): the table of docs/architecture.md
RPC_ROOMS = {
    "wire": set(),
    "service": set(),
    "tracker": {"wire", "service"},
    "server": {"wire", "service", "tracker"},
    "proxy": {"wire", "service", "tracker"},
    "client": {"wire", "tracker", "server"},
}
# the only modules of a room that another room may use, where that is narrower than the whole room
RPC_NARROW = {("client", "server"): {"workbench.rpc.server.handler"}}  # LocalSession serves itself


def _modules(top: str) -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imports(name: str, path: pathlib.Path, is_package: bool, modules: dict) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of the same top-level package; unresolved ones as written."""
    top = name.split(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name
                    if top == "benchmarks" and f"benchmarks.{target}" in modules:  # run as a script: `import harness`
                        target = f"benchmarks.{target}"
                    if target.split(".")[0] == top:
                        found.append((child.lineno, target))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                    if top == "benchmarks" and f"benchmarks.{module}" in modules:
                        module = f"benchmarks.{module}"
                if module.split(".")[0] == top:
                    for alias in child.names:
                        sub = f"{module}.{alias.name}"
                        found.append((child.lineno, sub if sub in modules else module))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _extension(module: str) -> bool:
    """A C extension built from a source next to where its module would be (``runtime/_shim.c``)."""
    return (ROOT / pathlib.Path(*module.split("."))).with_suffix(".c").exists()


def _graph(top: str) -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules(top)
    edges: dict[str, set[str]] = {}
    unresolved = []
    for name, (path, is_package) in modules.items():
        edges[name] = set()
        for line, target in _imports(name, path, is_package, modules):
            if target not in modules:
                if not _extension(target):
                    unresolved.append(f"{path.relative_to(ROOT)}:{line}: no module {target}")
            elif target != name:
                edges[name].add(target)
    return edges, unresolved


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _describe(cycle: list[str], edges: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & set(cycle)))}" for m in cycle)


@pytest.mark.parametrize("top", ["workbench", "benchmarks"])
def test_no_import_cycles_and_every_import_resolves(top):
    edges, unresolved = _graph(top)
    assert not unresolved, "\n".join(unresolved)
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges) for c in cycles)


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    """The check above can fail: a cycle closed by an import inside a function is one."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .b import x\nif TYPE_CHECKING:\n    from .c import y\n")
    path = ROOT / "tests" / "_graph_probe.py"
    path.write_text(ast.unparse(tree))
    try:
        modules = {"pkg.a": (path, False), "pkg.b": (path, False), "pkg.c": (path, False)}
        assert _imports("pkg.a", path, False, modules) == [(2, "pkg.b")]  # the function's import; not the other
    finally:
        path.unlink()


def test_rpc_rooms_import_only_the_rooms_below_them():
    edges, _ = _graph("workbench")
    wrong = []
    for module, targets in edges.items():
        parts = module.split(".")
        if parts[:2] != ["workbench", "rpc"] or len(parts) < 4:
            continue
        room = parts[2]
        for target in targets:
            tparts = target.split(".")
            if tparts[:2] != ["workbench", "rpc"]:
                continue
            if len(tparts) < 3:
                wrong.append(f"{module} imports the package workbench.rpc (import the room's module instead)")
                continue
            other = tparts[2]
            if other == room:
                continue
            allowed = other in RPC_ROOMS[room]
            narrow = RPC_NARROW.get((room, other))
            if not allowed or (narrow is not None and target not in narrow):
                wrong.append(f"{module} imports {target}: room {room!r} may import only {sorted(RPC_ROOMS[room])}"
                             + (f" (of {other!r}: {sorted(narrow)})" if narrow else ""))
    assert not wrong, "\n".join(wrong)
    rooms = {p.name for p in (ROOT / "workbench" / "rpc").iterdir() if (p / "__init__.py").exists()}
    assert rooms == set(RPC_ROOMS), "a room of workbench.rpc is missing from the table (and docs/architecture.md)"
    loose = sorted(p.name for p in (ROOT / "workbench" / "rpc").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside any room of workbench.rpc: {loose}"


def test_nothing_outside_the_notebook_layer_imports_it():
    edges, _ = _graph("workbench")
    wrong = sorted(
        f"{module} -> {target}" for module, targets in edges.items() for target in targets
        if target.startswith("workbench.notebook") and not module.startswith("workbench.notebook")
        and module != "workbench"  # load_ipython_extension, which only IPython calls
    )
    assert not wrong, wrong
