"""The package's import rules, read from the source (docs/design.md states
them): which part may import which, no cycles, and imports inside functions
only where a command chooses its module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shmkey

PACKAGE = Path(shmkey.__file__).resolve().parent

# What each part of the package may import of shmkey. A part is a top-level
# module or a subpackage; the core modules are shared by every part.
CORE = {"errors", "_binding", "_native", "_version", "config", "names", "_wire", "_process", "_stats",
        "_p11uri", "_notify", "_held"}
MAY_IMPORT = {
    "errors": set(),
    "oracle": CORE,
    "client": CORE,
    "launcher": CORE | {"client"},
    "openssl": CORE | {"client"},
    "sandbox": CORE,
    "proxy": CORE | {"client", "openssl", "launcher", "sandbox"},
    "tools": CORE | {"client", "openssl", "launcher", "proxy", "sandbox", "tools", "__init__"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names a ``from ... import ...`` brings in (modules where known)."""
    if node.level:
        base = module.split(".")
        if not is_package:
            base.pop()
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of shmkey names."""
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    inner: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue            # annotations only: no import at run time
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                names = _resolve(module, path.name == "__init__.py", child)
            elif isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            (inner if in_function else top).update(n for n in names if n.startswith("shmkey"))
            visit(child, nested)

    visit(tree, False)
    return top, inner


def _modules() -> dict[str, tuple[set[str], set[str]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str, modules: set[str]) -> str | None:
    """The module ``name`` refers to (an attribute import names its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_parts_import_only_what_they_may() -> None:
    modules = _modules()
    wrong = []
    for module, (top, inner) in modules.items():
        part = _part(module)
        allowed = MAY_IMPORT.get(part)
        if allowed is None:
            continue            # __init__, cli, __main__: the front doors
        for name in top | inner:
            target = _known(name, set(modules))
            if target is None or target == "shmkey":
                if name.split(".")[1:2] and name.split(".")[1] not in allowed | {part}:
                    wrong.append(f"{module} imports {name}")
                continue
            other = _part(target)
            if other != part and other not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports across the package's parts that design.md does not allow:\n" + \
        "\n".join(wrong)


def test_errors_imports_nothing_of_shmkey() -> None:
    top, inner = _modules()["shmkey.errors"]
    assert not top and not inner


def test_only_the_command_line_imports_inside_functions() -> None:
    offenders = {m: sorted(inner) for m, (_, inner) in _modules().items()
                 if inner and m != "shmkey.cli"}
    assert not offenders, f"imports of shmkey inside functions (hidden cycles?): {offenders}"


def test_tools_are_imported_only_by_the_command_line() -> None:
    users = {m for m, (top, inner) in _modules().items()
             if not m.startswith("shmkey.tools") and m != "shmkey.cli"
             and any(n.startswith("shmkey.tools") for n in top | inner)}
    assert not users


def test_no_import_cycles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: {t for n in top if (t := _known(n, known)) and t != m}
             for m, (top, _) in modules.items()}
    # A package's __init__ re-exports its modules; a module importing a sibling
    # through the package name is not a cycle with that __init__.
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t in m.split(".")[:-1] or m.startswith(t + "."):
                continue        # a module and its own package's __init__
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(t):
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            walk(m)
