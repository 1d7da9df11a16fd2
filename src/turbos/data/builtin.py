"""Built-in corpora that need no download: Python's own documentation and generated reasoning tasks.

- `PythonDocstrings` (`builtin:pydocs`): the docstrings of the Python standard library installed
  on this machine (`sysconfig.get_paths()["stdlib"]`), read by parsing each module with `ast`,
  one document per module, class or function docstring, in sorted-path then source order.
  Test suites, site-packages and files that do not parse on this interpreter are left out.
  That is roughly 2 MB of English prose about programming on CPython 3.11.
- `ReasoningDocs` (`builtin:reasoning`): worked solutions of the built-in reasoning tasks
  (question, steps, answer; see `turbos.data.tasks`), from the train split only, so held-out
  test questions never leak into pre-training.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from turbos.data.tasks import generate_problems, render_document

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and everything defined inside it, in source order."""
    if isinstance(node, _DOCUMENTED):
        docstring = ast.get_docstring(node)
        if docstring:
            yield docstring
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


@dataclass(frozen=True)
class PythonDocstrings:
    """Docstrings of every module under `root` (default: this interpreter's standard library)."""

    root: str | None = None

    def files(self) -> list[Path]:
        root = Path(self.root or sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise FileNotFoundError(f"no directory {str(root)!r} to read Python docstrings from")
        return sorted(p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts))

    def __iter__(self) -> Iterator[str]:
        for path in self.files():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules
                    tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue  # written for another Python version; documented above
            yield from _docstrings(tree)


@dataclass(frozen=True)
class ReasoningDocs:
    """`n` distinct worked problems of the train split, balanced over families x levels."""

    n: int = 10_000
    seed: int = 0
    families: tuple[str, ...] | None = None
    levels: tuple[int, ...] | None = None

    def __iter__(self) -> Iterator[str]:
        problems = generate_problems(self.n, families=self.families, levels=self.levels, seed=self.seed)
        return map(render_document, problems)
