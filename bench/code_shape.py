"""The code's shape against issue 25's goals, measured from the source (no imports of the package).

    python bench/code_shape.py [--json bench/results/code_shape.json]

Counts: entries at the top of ``src/superweight``; imports of the package's own modules inside
functions (each should carry a reason); private names imported across modules; function lengths
(``def`` to last line: longest, p90, median) and the longest ten.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "superweight"


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def own_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").startswith("superweight")
    if isinstance(node, ast.Import):
        return any(a.name.startswith("superweight") for a in node.names)
    return False


def measure() -> dict:
    lengths: list[tuple[int, str]] = []
    inner: list[str] = []
    private: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        tree = ast.parse(path.read_text())
        for fn in functions(tree):
            lengths.append((fn.end_lineno - fn.lineno + 1, f"{rel}:{fn.name}"))
            for node in ast.walk(fn):
                if own_import(node):
                    inner.append(f"{rel}:{node.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and own_import(node):
                private += [f"{rel}:{node.lineno} {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    sizes = sorted(n for n, _ in lengths)
    top = [p.name for p in ROOT.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")]
    return {
        "top_level_entries": len(top),
        "imports_inside_functions": len(inner),
        "private_names_imported": private,
        "functions": len(sizes),
        "longest": sizes[-1],
        "p90": sizes[int(0.9 * (len(sizes) - 1))],
        "median": statistics.median(sizes),
        "longest_ten": [f"{n} {name}" for n, name in sorted(lengths, reverse=True)[:10]],
        "inside_function_imports_at": inner,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    got = measure()
    shown = {k: v for k, v in got.items() if k != "inside_function_imports_at"}
    print(json.dumps(shown, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(got, indent=2) + "\n")


if __name__ == "__main__":
    main()
