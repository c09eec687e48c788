"""The package's stack: each folder imports only from the folders below it (docs/architecture.md).

core < model < eval < {find, prove, quant} < {train, testing} < report < cli. Read from
the source's own import statements (module level and inside functions alike), so a leak cannot hide
inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

import superweight

PACKAGE = Path(superweight.__file__).parent
LAYER = {"core": 0, "model": 1, "eval": 2, "find": 3, "prove": 3, "quant": 3,
         "train": 4, "testing": 4, "report": 5, "cli": 6}


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, target module as parts below ``superweight``) of every import of the package's own modules."""
    pkg = list(path.relative_to(PACKAGE).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").startswith("superweight."):
                    out.append((node.lineno, node.module.split(".")[1:]))
                continue
            base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            out.append((node.lineno, base + (node.module.split(".") if node.module else [])))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1:]) for a in node.names if a.name.startswith("superweight.")]
    return out


def test_every_folder_of_the_package_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYER)


def test_the_top_of_the_package_holds_its_layers_and_its_face_only():
    """10 folders, ``__init__.py`` (the Python API) and ``__main__.py`` (``python -m superweight``)."""
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries - set(LAYER) == {"__init__.py", "__main__.py"}


def test_imports_point_only_down_the_stack():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue  # the package's face (__init__, __main__) sits above everything
        me = parts[0]
        for line, target in _imports(path):
            if target and target[0] in LAYER and target[0] != me and LAYER[target[0]] >= LAYER[me]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)}")
    assert not wrong, "\n".join(wrong)
