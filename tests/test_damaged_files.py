"""A damaged model directory (truncated weights, a config.json that is not JSON, a truncated
tokenizer.json) gives every command that loads it a one-line error naming the file, never a
traceback; the Python API raises DamagedFileError naming it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import save_model_dir
from turbos.cli import main
from turbos.config import DamagedFileError
from turbos.model import TurboSForCausalLM
from turbos.serve import LLMEngine


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{not json")


DAMAGES = {
    "truncated-weights": ("model.safetensors", truncate),
    "garbled-config": ("config.json", garble),
    "truncated-tokenizer": ("tokenizer.json", truncate),
}

COMMANDS = {
    "serve": ["serve", "--port", "1"],
    "generate": ["generate", "--prompt", "hi"],
    "eval-ppl": ["eval-ppl", "--data", "builtin:reasoning"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, model_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the model directory with one file damaged; (directory, damaged file)."""
    name, damage = DAMAGES[request.param]
    directory = Path(shutil.copytree(model_dir, tmp_path / "model"))
    damage(directory / name)
    return directory, directory / name


def assert_one_line_naming(stderr: str, path: Path) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1, f"one line expected, got:\n{stderr}"
    assert str(path) in stderr and "damaged" in stderr, stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_name_the_damaged_file_in_one_line(damaged, command, capsys) -> None:
    directory, path = damaged
    code = main([*COMMANDS[command], "--model", str(directory)])
    assert code != 0
    assert_one_line_naming(capsys.readouterr().err, path)


def test_the_python_api_raises_damaged_file_error_naming_the_file(damaged) -> None:
    directory, path = damaged
    load = LLMEngine.from_pretrained if path.name == "tokenizer.json" else TurboSForCausalLM.from_pretrained
    with pytest.raises(DamagedFileError) as err:
        load(directory)
    assert err.value.path == path


def test_turbos_serve_on_truncated_weights_exits_with_one_line(model_dir, tmp_path) -> None:
    """The command as a user runs it, in its own process."""
    directory = Path(shutil.copytree(model_dir, tmp_path / "model"))
    truncate(directory / "model.safetensors")
    run = subprocess.run(
        [sys.executable, "-m", "turbos.cli", "serve", "--model", str(directory), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and run.stdout == ""
    assert_one_line_naming(run.stderr, directory / "model.safetensors")
