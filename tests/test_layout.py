"""The package's shape stays as docs/architecture.md describes it: layer boundaries, small modules, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedseek"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# layer -> packages it must not import (see docs/architecture.md)
FORBIDDEN = {
    "ops": ("fedseek.runtime",),
    "privacy": ("flwr", "fedseek.runtime", "fedseek.ops", "fedseek.wire"),
    "sparsity": ("flwr", "fedseek.runtime", "fedseek.ops"),
    "train": ("flwr", "fedseek.runtime", "fedseek.ops", "fedseek.wire"),
    "watermark": ("flwr", "fedseek.runtime", "fedseek.ops"),
    "data": ("flwr.app", "flwr.serverapp", "flwr.clientapp", "fedseek.runtime", "fedseek.ops"),
    "wire": ("fedseek.runtime", "fedseek.ops"),
    "outputs": ("fedseek.runtime", "fedseek.ops"),
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_short():
    long = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over {} lines:\n{}".format(MAX_FUNCTION_LINES, "\n".join(long))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_what_they_may(layer):
    bad = []
    for p in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(ast.parse(p.read_text())):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{p.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_product_does_not_point_outside_the_repository():
    hits = [str(p.relative_to(ROOT)) for p in [*_modules(), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
            if "../shared" in p.read_text()]
    assert not hits, f"files pointing at ../shared: {hits}"
