"""JSON Lines files, one JSON object per line, read with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A line of a JSONL file is not what its reader needs; the message starts ``path:line:``."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = Path(path), line, problem


def read_jsonl(
    path: str | os.PathLike, what: str = "JSONL", cut_last_line: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``path``, in order.

    FileNotFoundError ``no {what} file 'path'`` at the call (not at the first record); a line that
    is not valid JSON, or not an object, is a JsonlError naming its line. ``cut_last_line``: a last
    line that is not valid JSON ends the records instead, as a writer killed mid-line leaves it
    (nothing after it is lost).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {str(path)!r}")
    return _records(path, cut_last_line)


def _records(path: Path, cut_last_line: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if cut_last_line and not lines.read().strip():
                    return
                raise JsonlError(path, number, f"not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise JsonlError(path, number, f"expected a JSON object, got {type(record).__name__}")
            yield number, record
