"""The house rules, read from the source with the standard library only (``ast``, nothing is imported).

- No import cycles among hasten's modules.
- Layers: a module imports only modules of its own layer or lower ones (``LAYERS``).
- No source file in ``hasten/`` is over ``MAX_LINES`` lines.
- No test file is named after a tracker issue.

Imports are those that run when a module is imported (module level, class bodies, ``try`` and ``if`` blocks) and
those of ``if TYPE_CHECKING:`` blocks: they never run, but they are dependencies all the same (to read one file you
must read the other), so both rules count them. Imports inside functions run late and cannot close a cycle at import
time; they are left out of both rules, and those that reach a higher layer or close a cycle are reported as warnings.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hasten"
MAX_LINES = 450

# The modules (or packages) of the distilled draft model; keep this list in step with their names.
DRAFT_MODEL_MODULES = ("hasten.draft",)

# Bottom to top. A module takes the layer of its own name, else of the nearest package above it listed here.
LAYERS: dict[str, int] = {
    # 1. Foundations: errors, token trees, sampling, the protocol every backend implements, values kept per model.
    "hasten.errors": 1,
    "hasten.tree": 1,
    "hasten.sampling": 1,
    "hasten.penalties": 1,
    "hasten.logprobs": 1,
    "hasten.grammar": 1,
    "hasten.response_format": 1,
    "hasten.backends.base": 1,
    "hasten.per_model": 1,
    # 2. The backends: llama.cpp and transformers behind that protocol (``hasten.backends`` itself re-exports the
    #    transformers backend).
    "hasten.backends": 2,
    "hasten.backends.llamacpp": 2,
    "hasten.backends.transformers": 2,
    # 3. The pieces proposers are made of: verification, the adaptive chooser, ReDrafter's head, the draft model.
    "hasten.verify": 3,
    "hasten.shaping": 3,
    "hasten.adaptive": 3,
    "hasten.redrafter": 3,
    **{module: 3 for module in DRAFT_MODEL_MODULES},
    # 4. The proposers, one per method.
    "hasten.proposers": 4,
    # 5. Decoding and its public API. ``text`` (incremental detokenization) imports no hasten module: it sits with
    #    its user, the API, rather than among the foundations it does not need.
    "hasten.engine": 5,
    "hasten.batching": 5,
    "hasten.methods": 5,
    "hasten.models": 5,
    "hasten.text": 5,
    "hasten.api": 5,
    # 6. The applications: benchmark, server, training, the command line.
    "hasten.bench": 6,
    "hasten.server": 6,
    "hasten.training": 6,
    "hasten.commands": 6,
    "hasten.cli": 6,
    # 7. ``hasten`` itself (hasten/__init__.py) re-exports the API for ``import hasten``: it is the top, and no
    #    module of the package may import it (they import the module that defines what they need).
    "hasten": 7,
}


@dataclass(frozen=True, order=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function: runs on call, not on import
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never runs, still a dependency


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The hasten modules an import statement names (``from a import b`` names ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if node.level:  # relative: from the importer's package, up ``level - 1`` more
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    names = [f"{base}.{alias.name}" for alias in node.names]
    found = [name for name in names if name in modules]
    if len(found) < len(names) and base in modules:  # some names are attributes of ``base`` itself
        found.append(base)
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import of a hasten module in one file, with whether it sits inside a function and whether it sits
    under ``if TYPE_CHECKING:``."""
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.body:
                visit(child, local, True)
            for child in node.orelse:
                visit(child, local, type_only)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.extend(Import(name, target, node.lineno, local, type_only)
                         for target in targets(node, name, is_package, modules) if target != name)
            return
        inner = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_only)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    return [item for name, path in modules.items() for item in imports_of(name, path, set(modules))]


def layer(module: str) -> int | None:
    """The layer of ``module``: its own entry, else its nearest listed package (``hasten`` itself only exactly)."""
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):
        package = ".".join(parts[:end])
        if package in LAYERS:
            return LAYERS[package]
    return None


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    graph: dict[str, list[str]] = {}
    for source, target in sorted(edges):
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return sorted(found)


def upward(imports: list[Import]) -> set[tuple[str, str]]:
    """The (importer, imported) edges that reach a higher layer."""
    return {(item.importer, item.imported) for item in imports
            if (layer(item.imported) or 0) > (layer(item.importer) or 0)}


def test_every_module_has_a_layer():
    assert [name for name in all_modules() if layer(name) is None] == []
    assert all(module in all_modules() for module in DRAFT_MODEL_MODULES), "update DRAFT_MODEL_MODULES"


def test_no_import_cycles():
    imports = all_imports()
    found = cycles({(item.importer, item.imported) for item in imports if not item.local})
    assert found == [], "import cycles"
    for component in cycles({(item.importer, item.imported) for item in imports}):
        if component not in found:
            warnings.warn(f"a cycle through imports inside functions: {', '.join(component)}", stacklevel=1)


def test_imports_go_down_the_layers():
    imports = all_imports()
    violations = upward([item for item in imports if not item.local])
    assert violations == set(), "imports from a higher layer"
    for item in sorted(item for item in imports if item.local):
        if (item.importer, item.imported) in upward([item]):
            warnings.warn(f"{item.importer}:{item.line} imports {item.imported} (layer {layer(item.imported)}) "
                          f"inside a function, from layer {layer(item.importer)}", stacklevel=1)


def test_no_source_file_is_too_long():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
               for path in all_modules().values()}
    assert {path: lines for path, lines in lengths.items() if lines > MAX_LINES} == {}


def test_no_test_file_is_named_after_an_issue():
    assert sorted(path.name for path in (ROOT / "tests").glob("test_issue*")) == []


# The checker itself, on small sources.

def imports_of_sources(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    modules = {f"hasten.{name[:-3]}" for name in files}
    imports = []
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        imports += imports_of(f"hasten.{name[:-3]}", path, modules)
    return imports


def test_the_checker_finds_a_cycle_and_ignores_local_imports(tmp_path):
    imports = imports_of_sources(tmp_path, {
        "a.py": "from hasten import b\n",
        "b.py": "import hasten.c\n",
        "c.py": "def f():\n    from hasten.a import y\nfrom hasten import a\n",
        "d.py": "def f():\n    from hasten.a import y\n",
    })
    assert {(i.importer, i.imported, i.local, i.type_only) for i in imports} == {
        ("hasten.a", "hasten.b", False, False), ("hasten.b", "hasten.c", False, False),
        ("hasten.c", "hasten.a", True, False), ("hasten.c", "hasten.a", False, False),
        ("hasten.d", "hasten.a", True, False)}
    assert cycles({(i.importer, i.imported) for i in imports if not i.local}) == [["hasten.a", "hasten.b",
                                                                                   "hasten.c"]]
    assert cycles({("hasten.a", "hasten.b"), ("hasten.b", "hasten.c")}) == []


def test_the_checker_counts_type_checking_imports(tmp_path):
    imports = imports_of_sources(tmp_path, {
        "a.py": "from hasten import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hasten.a import x\n"
                "else:\n    import hasten.c\n",
        "c.py": "import typing\nif typing.TYPE_CHECKING:\n    def f():\n        from hasten.a import y\n",
    })
    assert {(i.importer, i.imported, i.local, i.type_only) for i in imports} == {
        ("hasten.a", "hasten.b", False, False), ("hasten.b", "hasten.a", False, True),
        ("hasten.b", "hasten.c", False, False), ("hasten.c", "hasten.a", True, True)}
    assert cycles({(i.importer, i.imported) for i in imports if not i.local}) == [["hasten.a", "hasten.b"]]
    assert upward([Import("hasten.tree", "hasten.verify", 3, False, True)]) == {("hasten.tree", "hasten.verify")}


def test_the_checker_resolves_relative_imports_and_ranks_layers(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from . import tree\nfrom .base import Target\nfrom ..errors import HastenError\n")
    modules = {"hasten.backends.base", "hasten.backends.x", "hasten.tree", "hasten.backends.tree", "hasten.errors"}
    assert [i.imported for i in imports_of("hasten.backends.x", path, modules)] == [
        "hasten.backends.tree", "hasten.backends.base", "hasten.errors"]
    assert layer("hasten.backends.base") == 1 and layer("hasten.backends.llamacpp.target") == 2
    assert layer("hasten.backends.transformers.target") == 2 and layer("hasten.backends") == 2
    assert layer("hasten.server.worker") == 6 and layer("hasten") == 7 and layer("hasten.unknown") is None
    assert upward([Import("hasten.verify", "hasten.proposers.base", 1, False)]) == {
        ("hasten.verify", "hasten.proposers.base")}
