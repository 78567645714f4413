"""The package's layers, checked from the source: who may import whom (docs/architecture.md draws them).

Every ``minipeft`` import is read from the syntax tree, the ones inside functions included, so a lazy import
cannot hide a dependency that the folder names do not show.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minipeft"
ARCHITECTURE_PAGE = PACKAGE.parent / "docs" / "architecture.md"

# Each folder may import from itself and from the folders before it, never from one after it.
LAYERS = ["builtin", "core", "files", "quantization", "loading", "methods", "model", "data", "fast", "training",
          "inference", "pretraining", "cli"]

# The folders only the command line may import: the programs that use the library.
PROGRAMS = ["pretraining", "cli"]


def method_variants() -> dict:
    """A method imports only core. The one exception is a variant of another method, which builds on it: its
    record says so (``Method.variant_of``; DoRA's module imports LoRA's)."""
    from minipeft.methods import METHODS

    return {method.module: {METHODS[method.variant_of].module} for method in METHODS.values() if method.variant_of}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def minipeft_imports(path: Path) -> set:
    """The ``minipeft...`` modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minipeft":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "minipeft")
    return found


def folder_of(module: str):
    """``minipeft.methods.lora`` -> ``methods``; the package's own top-level files -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if "builtin/model" not in path.as_posix())


def test_every_module_lives_in_a_layer():
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert top_level == ["__init__.py", "__main__.py"]
    folders = sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__")
    assert folders == sorted(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_imports_follow_the_layers(path):
    module = module_name(path)
    folder = folder_of(module)
    if folder is None:  # minipeft/__init__.py and __main__.py sit above every layer
        return
    allowed = set(LAYERS[:LAYERS.index(folder) + 1])
    wrong = sorted(imported for imported in minipeft_imports(path)
                   if folder_of(imported) not in allowed)
    assert not wrong, f"{module} ({folder}/) imports {wrong}; {folder}/ may import only {sorted(allowed)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").glob("*.py")), ids=lambda path: path.stem)
def test_methods_import_only_core(path):
    module = module_name(path)
    if module == "minipeft.methods":  # the registry lists the methods
        return
    others = {imported for imported in minipeft_imports(path) if folder_of(imported) != "core"}
    assert others <= method_variants().get(module, set()), f"{module} imports {sorted(others)}"


@pytest.mark.parametrize("program", PROGRAMS)
def test_nothing_but_the_command_line_imports_a_program(program):
    importers = sorted(module_name(path) for path in SOURCES
                       if folder_of(module_name(path)) not in (program, "cli", None)
                       and any(folder_of(imported) == program for imported in minipeft_imports(path)))
    assert importers == []


def folders_drawn_on_the_architecture_page() -> list:
    """The folder names of the picture in docs/architecture.md, top to bottom (``  name/   ...`` lines)."""
    block = ARCHITECTURE_PAGE.read_text(encoding="utf-8").split("```text\n", 1)[1].split("```", 1)[0]
    return [match.group(1) for match in re.finditer(r"^  (\w+)/ ", block, re.MULTILINE)]


def test_the_architecture_page_draws_the_layers_in_order():
    assert folders_drawn_on_the_architecture_page() == LAYERS


def top_level_imports(path: Path) -> set:
    """The ``minipeft...`` modules ``path`` imports when it is itself imported: the imports outside every
    function and class (those inside a module-level ``if`` or ``try`` included)."""
    found = set()
    statements = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minipeft":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "minipeft")
        statements.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def import_circle(graph: dict):
    """A cycle of ``graph`` (``{module: modules it imports}``) as ``[a, b, ..., a]``, or None: a depth-first
    search that meets a module still on its own path has gone round a circle."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done or module not in graph:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            circle = visit(imported)
            if circle:
                return circle
        path.pop()
        done.add(module)
        return None

    return next((circle for circle in map(visit, sorted(graph)) if circle), None)


def test_the_circle_search_finds_a_circle_and_only_a_circle():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    """The modules' top-level imports form no cycle: importing any module never needs itself half-done. (A
    circle kept alive by an import inside a function is still a circle of meaning: move the shared piece to
    the module it belongs to instead.)"""
    graph = {module_name(path): top_level_imports(path) - {module_name(path)} for path in SOURCES}
    circle = import_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def imports_inside_functions(path: Path) -> list:
    """``(line number, line)`` of each ``minipeft`` import inside a function of ``path``."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            module = node.module if isinstance(node, ast.ImportFrom) else (
                node.names[0].name if isinstance(node, ast.Import) else None)
            if module and module.split(".")[0] == "minipeft":
                found.append(node.lineno)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, lines[number - 1]) for number in sorted(set(found))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_an_import_inside_a_function_says_why(path):
    """A ``minipeft`` import belongs at the top of the file, where a reader sees what the module needs. One
    inside a function stays only with a comment, on its line or the line above, saying why (a slow import
    kept off ``--help`` and ``import minipeft``, an optional dependency)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    unexplained = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
                   for number, line in imports_inside_functions(path)
                   if "#" not in line and not lines[number - 2].strip().startswith("#")]
    assert not unexplained, "move these imports to the top of the file, or say why they stay:\n" + "\n".join(
        unexplained)


def test_import_minipeft_loads_no_library():
    """``import minipeft`` is instant: names load on first use, so Ctrl-C while torch loads is the command
    line's to handle (exit 130, no traceback)."""
    import subprocess
    import sys

    code = "import sys, minipeft; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_draws_the_same_picture():
    picture = ARCHITECTURE_PAGE.read_text(encoding="utf-8").split("```text\n", 1)[1].split("```", 1)[0]
    assert picture in (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
