"""Rules of the repository itself: one optimizer step for every kind of training, a README a
newcomer can read, and no reference to anything outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "turbos").rglob("*.py"))


def test_pretraining_and_sft_share_one_optimizer_step_site() -> None:
    calls = re.compile(r"^\s*[\w.]*optimizer\.step\(\)")  # a call statement, not a docstring mention
    sites = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if calls.match(line)
    ]
    assert len(sites) == 1 and sites[0].startswith("src/turbos/train/loop.py:"), (
        f"one optimizer.step() call, in train/loop.py; found {sites}"
    )


def test_the_readme_stays_under_300_lines() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; studies and long explanations go to docs/"


def test_nothing_refers_to_files_outside_the_repository() -> None:
    pattern = re.compile(r"DESIGN\.md|STYLE\.md|TURBOS\.md|\.\./shared|the issue")
    files = [*SOURCES, *(ROOT / "tests").rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if path.name != "test_repo_rules.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, f"references to files outside the repository: {hits}"
