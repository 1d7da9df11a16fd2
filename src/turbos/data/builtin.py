"""Built-in corpora that need no download: Python's own documentation and generated reasoning tasks.

- `PythonDocstrings` (`builtin:pydocs`): the docstrings of the Python standard library installed
  on this machine (`sysconfig.get_paths()["stdlib"]`), read by parsing each module with `ast`,
  one document per module, class or function docstring, in sorted-path then source order; read
  once per process and root, then kept.
  Test suites, site-packages and files that do not parse on this interpreter are left out.
  That is roughly 2 MB of English prose about programming on CPython 3.11.
- `ReasoningDocs` (`builtin:reasoning`): worked solutions of the built-in reasoning tasks
  (question, steps, answer; see `turbos.data.tasks`), from the train split only, so held-out
  test questions never leak into pre-training.
"""

from __future__ import annotations

import ast
import functools
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
        return list(_python_files(self.root or sysconfig.get_paths()["stdlib"]))

    def __iter__(self) -> Iterator[str]:
        return iter(_read_docstrings(self.root or sysconfig.get_paths()["stdlib"]))


# Both are kept per root: a training run reads the corpus once for its tokenizer and again for
# every stage's stream and validation batches.
@functools.lru_cache(maxsize=2)
def _python_files(root: str) -> tuple[Path, ...]:
    top = Path(root)
    if not top.is_dir():
        raise FileNotFoundError(f"no directory {root!r} to read Python docstrings from")
    return tuple(sorted(p for p in top.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(top).parts)))


@functools.lru_cache(maxsize=2)
def _read_docstrings(root: str) -> tuple[str, ...]:
    """Every docstring of the files under ``root``, in order."""
    found: list[str] = []
    for path in _python_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # written for another Python version; documented above
        found.extend(_docstrings(tree))
    return tuple(found)


@dataclass(frozen=True)
class ReasoningDocs:
    """`n` distinct worked problems of the train split, balanced over families x levels."""

    n: int = 10_000
    seed: int = 0
    families: tuple[str, ...] | None = None
    levels: tuple[int, ...] | None = None

    def __iter__(self) -> Iterator[str]:
        families = None if self.families is None else tuple(self.families)  # hashable for the cache
        levels = None if self.levels is None else tuple(self.levels)
        return iter(_reasoning_documents(self.n, self.seed, families, levels))


@functools.lru_cache(maxsize=8)
def _reasoning_documents(
    n: int, seed: int, families: tuple[str, ...] | None, levels: tuple[int, ...] | None
) -> tuple[str, ...]:
    """Rendered problems of `ReasoningDocs`: generating them is slow, and they never change."""
    return tuple(map(render_document, generate_problems(n, families=families, levels=levels, seed=seed)))
