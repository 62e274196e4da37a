"""The shape of the code (issue 14): no import cycles, PPQ and torch behind their boundary, a
docstring line atop every module.

Imports are read from the source (``ast``), so a lazy import inside a function and one under
``if TYPE_CHECKING:`` count like any other: a cycle through either is still a cycle in the design.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("xquant", "xquant_core", "xquant_plugins")

#: the only modules that may import PPQ or torch (issue 14): the engine's backend package (PPQ's
#: IR, op table and import compatibility, and the torch functions the algorithms call) and the
#: SpacemiT platform's quantizer and exporter, which speak PPQ's quantization configs
HEAVY_ALLOWED = ("xquant_core.engine.backend", "xquant_plugins.spacemit.quantizer", "xquant_plugins.spacemit.exporter")
#: PPQ's private attributes the code reaches into: only where PPQ may be imported
PPQ_PRIVATE = re.compile(
    r"\._(scale|offset|dequantized|dominator|executing_context|delegates|default_quant_fn|hook_to|detail|"
    r"quant_min|quant_max|graph_input_dictionary|executing_order)\b"
)


def behind_the_boundary(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in HEAVY_ALLOWED)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name an import statement of the module brings in, relative ones resolved."""
    names = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names += [f"{prefix}.{alias.name}" for alias in node.names]
    return names


def dependency_graph() -> dict[str, set[str]]:
    """module -> the xquant modules it imports (the longest module prefix of each imported name)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module, path in known.items():
        for name in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                target = ".".join(parts[:end])
                if target in known:
                    if target != module:
                        graph[module].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(dependency_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("heavy", ["ppq", "torch"])
def test_ppq_and_torch_stay_behind_their_boundary(heavy):
    offenders = sorted(module for module, path in modules().items()
                       if not behind_the_boundary(module)
                       and any(name.split(".")[0] == heavy for name in imported_names(module, path)))
    assert offenders == [], f"{heavy} imported outside {HEAVY_ALLOWED}"


def test_ppq_s_private_attributes_are_touched_behind_the_boundary_only():
    touching = {module for module, path in modules().items() if PPQ_PRIVATE.search(path.read_text(encoding="utf-8"))}
    assert touching and {module for module in touching if not behind_the_boundary(module)} == set()



#: the longest function the packages may hold (issue 14), docstring and signature included
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines():
    long = sorted(
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    )
    assert long == []

def test_every_module_opens_with_one_line_saying_what_it_is_for():
    for module, path in modules().items():
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert docstring and docstring.strip(), f"{module} has no docstring"
        first = docstring.strip().splitlines()[0]
        assert len(first) <= 110 and not first.endswith(","), f"{module}: {first!r}"


def test_the_readme_layout_names_every_module_and_nothing_that_is_gone():
    """The README's layout table matches the tree: each module's file name appears in it, and each
    path it gives (a backticked name with a slash or ending in .py) exists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    missing = sorted(str(path.relative_to(REPO)) for module, path in modules().items()
                     if path.name != "__init__.py" and path.name not in layout)
    assert missing == [], f"not in the README's layout: {missing}"
    named = re.findall(r"`([\w./-]+)`", layout)
    rows = [line.split("|")[1] for line in layout.splitlines() if line.startswith("| `")]
    folders = [re.findall(r"`([\w./-]+/)`", row) for row in rows]
    gone = []
    for row, row_folders in zip(rows, folders):
        base = next((REPO / folder for folder in row_folders), REPO)
        for name in re.findall(r"`([\w./-]+)`", row):
            if not ((REPO / name).exists() or (base / name).exists() or (REPO / "xquant_core" / name).exists()):
                gone.append(name)
    assert named and gone == [], f"the README's layout names what is not there: {gone}"
