"""How the serving package depends on the rest: never on the training code, the HTTP server on the
engine only through ``AsyncLLMEngine``'s public interface, and the CLI's parser without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import turbos.serve
from turbos.serve.async_engine import AsyncLLMEngine

SERVE_DIR = Path(turbos.serve.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an ``import`` in the file names, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.strip()


@pytest.mark.parametrize("path", sorted(SERVE_DIR.glob("*.py")), ids=lambda path: path.name)
def test_no_serve_module_imports_the_training_package(path: Path) -> None:
    train = sorted(m for m in imported_modules(path) if m == "turbos.train" or m.startswith("turbos.train."))
    assert not train, f"{path.name} imports {train}"


def test_importing_every_serve_module_loads_no_training_module() -> None:
    loaded = run_python(
        "import importlib, pkgutil, sys, turbos.serve\n"
        "for module in pkgutil.iter_modules(turbos.serve.__path__):\n"
        "    importlib.import_module(f'turbos.serve.{module.name}')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[:2] == ['turbos', 'train']))"
    )
    assert loaded == "[]", f"importing turbos.serve loaded {loaded}"


def _is_engine(node: ast.expr) -> bool:
    """``engine`` or ``self.engine``: how server.py names its AsyncLLMEngine."""
    if isinstance(node, ast.Name):
        return node.id == "engine"
    return isinstance(node, ast.Attribute) and node.attr == "engine" and isinstance(node.value, ast.Name)


def test_the_server_uses_only_the_async_engine_interface() -> None:
    tree = ast.parse((SERVE_DIR / "server.py").read_text())
    used = {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _is_engine(node.value)
    }
    public = {name for name in dir(AsyncLLMEngine) if not name.startswith("_")}
    assert {"add_request", "encode", "max_context"} <= used, "the check sees the server's engine calls"
    assert used <= public, f"server.py reaches past AsyncLLMEngine: {sorted(used - public)}"


def test_the_cli_parser_builds_without_loading_torch() -> None:
    loaded = run_python("import sys, turbos.cli\nturbos.cli.build_parser()\nprint('torch' in sys.modules)")
    assert loaded == "False", "`turbos --help` and `turbos params` should not wait for torch to import"
