"""The package's layout rules, checked on its source: imports go one way (no circle), no module
imports another's private names, modules and functions stay a readable size, and the plugin
and the bounds load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_modelhooks"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
# a function this long says why on the line above its definition or in its first lines
LONG_FUNCTION_MARK = "long:"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_only(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module, module: str) -> Iterator[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` of every import in ``tree`` that runs (module level or
    inside a function), those under ``if TYPE_CHECKING:`` left out."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skipped.update(id(child) for child in ast.walk(node))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, target] if target else base)
            yield target, [alias.name for alias in node.names], node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, _ in _imports(ast.parse(path.read_text()), name):
            if target in MODULES and target != name:
                graph[name].add(target)
            # "from pytest_modelhooks import stats" imports the sub-package stats
            for imported in names:
                if f"{target}.{imported}" in MODULES:
                    graph[name].add(f"{target}.{imported}")
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for name in list(graph):
        for edge in list(graph[name]):
            parts = edge.split(".")
            graph[name].update(
                ".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) != name
            )
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for edge in sorted(graph[node]):
            # a package's own __init__ importing its submodules is how packages are built
            if edge.startswith(node + ".") or (node.startswith(edge + ".") and edge != "pytest_modelhooks"):
                continue
            if state.get(edge) == 1:
                return [*stack[stack.index(edge) :], edge]
            if edge not in state:
                found = visit(edge)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_imports_have_no_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_a_circle_is_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_names() -> None:
    offences = []
    for name, path in MODULES.items():
        for target, names, line in _imports(ast.parse(path.read_text()), name):
            if not target.startswith("pytest_modelhooks"):
                continue
            private = [imported for imported in names if imported.startswith("_")]
            if private:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert not offences, "\n".join(offences)


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_long_functions_say_why_they_are_not_split() -> None:
    offences = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            around = "\n".join(lines[max(0, node.lineno - 3) : node.lineno + 3])
            if LONG_FUNCTION_MARK not in around:
                offences.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)"
                )
    assert not offences, (
        f"functions over {MAX_FUNCTION_LINES} lines without a '# {LONG_FUNCTION_MARK} ...' comment "
        "saying why they cannot be split:\n" + "\n".join(offences)
    )


@pytest.mark.parametrize(
    "module",
    [
        "pytest_modelhooks.plugin",
        "pytest_modelhooks.health.bounds",
        "pytest_modelhooks.findings",
        "pytest_modelhooks.units",
    ],
)
def test_these_modules_load_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", f"importing {module} imported torch"
