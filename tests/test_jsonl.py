"""The JSONL reader: records with their line numbers, and errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbos.data.jsonl import JsonlError, read_jsonl


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


def test_records_come_with_their_file_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, '{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_a_line_that_is_not_json_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{"a": 1}\n\n{oops\n{"a": 2}\n')
    with pytest.raises(JsonlError, match=r"data\.jsonl:3: not valid JSON \(") as caught:
        list(read_jsonl(path))
    assert (caught.value.path, caught.value.line) == (path, 3)


def test_a_line_that_is_not_an_object_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_a_missing_file_is_named_at_the_call_not_at_the_first_record(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no chat data file '.*nope\.jsonl'"):
        read_jsonl(tmp_path / "nope.jsonl", "chat data")


def test_a_cut_last_line_ends_the_records_only_when_asked_and_only_at_the_end(tmp_path: Path) -> None:
    cut = write(tmp_path, '{"step": 1}\n{"step": 2}\n{"step": 3, "lo\n\n')
    assert [record["step"] for _, record in read_jsonl(cut, cut_last_line=True)] == [1, 2]
    with pytest.raises(JsonlError, match=r"data\.jsonl:3: not valid JSON"):
        list(read_jsonl(cut))
    middle = write(tmp_path, '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(JsonlError, match=r"data\.jsonl:2: not valid JSON"):
        list(read_jsonl(middle, cut_last_line=True))


def test_a_record_error_carries_the_file_and_line(tmp_path: Path) -> None:
    error = JsonlError(tmp_path / "x.jsonl", 7, "needs a 'messages' list")
    assert str(error) == f"{tmp_path / 'x.jsonl'}:7: needs a 'messages' list"
    assert isinstance(error, ValueError), "callers that catch ValueError still catch it"
